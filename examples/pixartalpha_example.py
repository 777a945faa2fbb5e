"""PixArt-α with caching (same flags as pixartsigma_example.py).

    python examples/pixartalpha_example.py --model PixArt-alpha/PixArt-XL-2-1024-MS --cache_method Fast
"""
from diffusers import PixArtAlphaPipeline

from xfuser.cli import run_example

if __name__ == "__main__":
    run_example(PixArtAlphaPipeline, "pixart-alpha", description=__doc__)
