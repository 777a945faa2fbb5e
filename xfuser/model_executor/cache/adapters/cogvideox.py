"""CogVideoX / CogVideoX1.5 and ConsisID: video tokens and text tokens as two streams,
returned as ``(hidden_states, encoder_hidden_states)``. ConsisID injects face features
between blocks; the manager's stack-level reuse is anchored on block outputs so those
injections are neither lost nor double-counted."""
from __future__ import annotations

import torch
from diffusers import CogVideoXTransformer3DModel, ConsisIDTransformer3DModel

from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, register_adapter


@register_adapter(CogVideoXTransformer3DModel)
class CogVideoXAdapter(BlockAdapter):
    family = "cogvideox"
    block_lists = ("transformer_blocks",)
    streams = ("hidden_states", "encoder_hidden_states")
    returns = ("hidden_states", "encoder_hidden_states")
    timestep_arg = "timestep"
    timestep_max = 1000.0
    # TeaCache, CogVideoX-5b (ali-vilab/TeaCache4CogVideoX1.5): highest power first
    tea_coefficients = (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02)
    supports_sequence_parallel = True
    # joint attention over [text; video]: both streams split, each rank attends with its rows of both
    sp_split_streams = ("hidden_states", "encoder_hidden_states")

    def install_usp_processors(self, transformer) -> None:
        from xfuser.model_executor.layers.usp_attention import USPCogVideoXAttnProcessor

        for _, block in self.iter_blocks(transformer):
            block.attn1.set_processor(USPCogVideoXAttnProcessor())

    def shard_block_kwargs(self, call: BlockCall, rank: int, world: int, full_lengths: dict[str, int]) -> None:
        self.slice_rotary(call, "image_rotary_emb", rank, world)  # video rows only

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        return call.block.norm1(call.arg("hidden_states"), call.arg("encoder_hidden_states"), call.arg("temb"))[0]


@register_adapter(ConsisIDTransformer3DModel)
class ConsisIDAdapter(CogVideoXAdapter):
    family = "consisid"
    # TeaCache's ConsisID entry reuses the CogVideoX-5b polynomial
