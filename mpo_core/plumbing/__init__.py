"""What carries data between stages: the recipe (config) and its language codes, artifacts and their
schemas, the stage table, run folders and the reuse rule, errors and progress."""
