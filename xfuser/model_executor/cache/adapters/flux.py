"""Flux.1: double-stream blocks then single-stream blocks; both update the image and text
streams and return ``(encoder_hidden_states, hidden_states)``. Timesteps arrive in [0, 1]."""
from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, register_adapter


@register_adapter(FluxTransformer2DModel)
class FluxAdapter(BlockAdapter):
    family = "flux"
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    streams = ("hidden_states", "encoder_hidden_states")
    returns = ("encoder_hidden_states", "hidden_states")
    timestep_arg = "timestep"
    timestep_max = 1.0
    # TeaCache, FLUX.1-dev (ali-vilab/TeaCache): highest power first
    tea_coefficients = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        return call.block.norm1(call.arg("hidden_states"), emb=call.arg("temb"))[0]
