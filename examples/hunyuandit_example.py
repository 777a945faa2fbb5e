"""HunyuanDiT-v1.2 with caching, CFG parallel and USP (its long skips stay rank-local under SP).

    torchrun --nproc_per_node=2 examples/hunyuandit_example.py --model Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers \
        --height 1024 --width 1024 --ulysses_degree 2 --cache_method Fast
"""
from diffusers import HunyuanDiTPipeline

from xfuser.cli import run_example

if __name__ == "__main__":
    run_example(HunyuanDiTPipeline, "hunyuandit", description=__doc__)
