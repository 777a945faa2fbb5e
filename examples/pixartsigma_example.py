"""PixArt-Σ with caching.

    python examples/pixartsigma_example.py                       # embedded trained model, FastCache
    python examples/pixartsigma_example.py --cache_method Fb --cache_ratio_threshold 0.1
    python examples/pixartsigma_example.py --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --height 1024 --width 1024
"""
from diffusers import PixArtSigmaPipeline

from xfuser.cli import run_example

if __name__ == "__main__":
    run_example(PixArtSigmaPipeline, "pixart-sigma", description=__doc__)
