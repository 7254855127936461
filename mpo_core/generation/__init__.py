"""Generation: one small backend interface (transformers, vLLM) and ``generate_responses``."""
