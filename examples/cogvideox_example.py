"""CogVideoX / CogVideoX1.5 text-to-video with caching, CFG parallel and USP over video tokens.

    torchrun --nproc_per_node=2 examples/cogvideox_example.py --model THUDM/CogVideoX1.5-5B \
        --num_frames 81 --height 768 --width 1360 --ulysses_degree 2 --cache_method Tea

The text stream (226 tokens) is split across the sequence-parallel ranks together with the
video tokens, so the SP degree must divide --max_sequence_length (226 = 2 x 113: degree 2).
Writes a GIF per prompt.
"""
from diffusers import CogVideoXPipeline

from xfuser.cli import run_example

if __name__ == "__main__":
    run_example(CogVideoXPipeline, "cogvideox", description=__doc__)
