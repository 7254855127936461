"""The MPO method itself: the objective (L1, L2 and the baselines), response log-likelihoods and pooled
states, the premise that the reference prefers the safe dominant answer (RG^d > 0), and random-weight
models and batches that exercise it without a download."""
