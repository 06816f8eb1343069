"""bench: a benchmark and evaluation harness for accelerated samplers of diffusion and flow models."""

__version__ = "0.1.0"
