"""ebmm: energy-based memory models from the shell."""

__version__ = "0.1.0"
