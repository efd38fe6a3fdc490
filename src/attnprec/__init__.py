"""attnprec: numerically rigorous precision analysis for log-space and linearized attention."""

__version__ = "0.1.0"
