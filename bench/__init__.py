"""bench: a benchmark harness for dense self-supervised learning."""

__version__ = "0.1.0"
