"""The MPO method itself: the equations (L1, L2, SimPO), the objective as trained (two backward passes),
response log-likelihoods and pooled states, the premise that the reference prefers the safe dominant answer
(RG^d > 0), and random-weight models and batches that exercise it without a download."""
