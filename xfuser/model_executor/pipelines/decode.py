"""Latents -> PIL images with the pipeline's own VAE and image processor.

Benchmarks generate with ``output_type="latent"`` (to compare final latents) and decode
afterwards, outside the timed region, so the image metrics see exactly what the pipeline
would have returned."""
from __future__ import annotations

from typing import Any

import torch


def decode_images(pipe: Any, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> list:
    vae = pipe.vae
    if hasattr(pipe, "_unpack_latents"):  # Flux packs latents into 2x2 patches
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil")
