"""vmq: compression toolchain for Vision Mamba models."""

__version__ = "0.1.0"
