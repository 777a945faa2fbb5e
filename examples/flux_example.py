"""Flux.1 with caching.

    python examples/flux_example.py --model black-forest-labs/FLUX.1-schnell --num_inference_steps 4 --cache_method Tea
"""
from diffusers import FluxPipeline

from xfuser.cli import run_example

if __name__ == "__main__":
    run_example(FluxPipeline, "flux", description=__doc__)
