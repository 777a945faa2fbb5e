"""Packaging for xfuser: caching + parallel inference for diffusion transformers.

torch is deliberately a *range* here (not a pin) so that a GPU user's CUDA build of torch is
kept; the reproducible CPU pin lives in requirements.txt.
"""
from setuptools import find_packages, setup

setup(
    name="xfuser",
    version="0.1.0",
    description="Cache-accelerated, multi-GPU inference for Diffusion Transformers (FastCache, FBCache, TeaCache + USP/PipeFusion/CFG parallel)",
    packages=find_packages(include=["xfuser", "xfuser.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "numpy",
        "scipy",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "diffusers": [
            "diffusers>=0.35",
            "transformers>=4.46",
            "sentencepiece",
            "safetensors",
            "yunchang>=0.6",
            "distvae>=0.1",
            "matplotlib",
            "scikit-image",
            "torchmetrics",
        ],
        # GPU only; never required. Needs a CUDA toolchain to build.
        "flash-attn": ["flash-attn>=2.6"],
        "test": ["pytest>=8"],
        # benchmark peers (benchmark/peers.py); skipped with a message when missing
        "peers": ["cache-dit>=1.5"],
    },
    package_data={"xfuser": ["model_executor/cache/coefficients/*.json"]},
)
