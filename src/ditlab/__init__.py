"""ditlab: a laboratory for diffusion transformers."""

__version__ = "0.1.0"
