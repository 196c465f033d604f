"""neuroal: one-shot LLM pruning algorithms (pure torch + transformers; never imports ray)."""

__version__ = "0.1.0"
