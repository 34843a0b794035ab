"""graphprune: a structured pruning compiler for neural networks."""

__version__ = "0.1.0"
