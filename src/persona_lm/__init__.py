"""persona-lm: a reproducible pipeline that builds a small personality chat model from scratch."""

__version__ = "0.1.0"
