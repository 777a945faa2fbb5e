"""HunyuanDiT: one image stream; blocks in the second half also read a long skip connection
from the first half, so the skip is an extra input of the change metric."""
from __future__ import annotations

import torch
from diffusers import HunyuanDiT2DModel

from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, register_adapter


@register_adapter(HunyuanDiT2DModel)
class HunyuanDiTAdapter(BlockAdapter):
    family = "hunyuandit"
    block_lists = ("blocks",)
    streams = ("hidden_states",)
    returns = None
    extra_inputs = ("skip",)
    timestep_arg = "timestep"
    timestep_max = 1000.0

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        return call.block.norm1(call.arg("hidden_states"), call.arg("temb"))
