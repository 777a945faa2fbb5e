"""Seeding per sample: image ``i`` of a request draws its initial noise from ``seed + i``.

Why: one generator shared by a batch draws the latents of all samples from one stream, so an
image would depend on its position in the batch, on its batch-mates and on how data
parallelism split the prompts. With one generator per sample (diffusers accepts a list, one
per image), an image depends only on (prompt, seed, index) -- the same in one process, under
data parallel, and when generated alone with ``seed + index``.

Index order is diffusers' batch order: prompt-major, ``num_images_per_prompt`` images per
prompt, so image ``m`` of prompt ``p`` is index ``p * num_images_per_prompt + m``.
"""
from __future__ import annotations

import torch


def sample_seed(seed: int, prompt_index: int, image_index: int = 0, num_images_per_prompt: int = 1) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` in a request seeded ``seed``."""
    return seed + prompt_index * num_images_per_prompt + image_index


def sample_generators(
    seed: int, num_prompts: int, first_prompt: int = 0, num_images_per_prompt: int = 1, device: str = "cpu"
) -> list[torch.Generator]:
    """One generator per image of prompts ``first_prompt .. first_prompt + num_prompts - 1``
    (global prompt indices, so a data-parallel replica draws what one process would).

    CPU generators by default: the same bits on every device, as diffusers recommends."""
    return [
        torch.Generator(device=device).manual_seed(sample_seed(seed, p, m, num_images_per_prompt))
        for p in range(first_prompt, first_prompt + num_prompts)
        for m in range(num_images_per_prompt)
    ]
