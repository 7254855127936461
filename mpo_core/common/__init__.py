"""Helpers several stages share: models and tokenizers, language identification, the judges' verdict
vocabulary and target-side label noise."""
