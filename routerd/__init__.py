"""routerd: one daemon that serves many models from one host."""

__version__ = "0.1.0"
