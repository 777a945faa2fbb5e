"""xfuser: cache-accelerated, parallel inference for Diffusion Transformers."""
__version__ = "0.1.0"
