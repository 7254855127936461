"""Training: examples and collation (:mod:`.examples`), the trainer and its callbacks (:mod:`.trainer`),
FSDP2 (:mod:`.sharding`), checkpoints and the saved model (:mod:`.checkpoints`), and :func:`.fit.fit`."""
