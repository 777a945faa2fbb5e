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

    supports_sequence_parallel = True
    sp_split_streams = ("hidden_states", "encoder_hidden_states")  # joint attention: split both
    supports_pipefusion = True
    image_embedder = "x_embedder"  # packed latent tokens -> image stream

    def install_pipefusion_processors(self, transformer, context) -> None:
        from xfuser.model_executor.layers.pipefusion_attention import PipeFusionFluxAttnProcessor

        for index, block in self.iter_blocks(transformer):
            block.attn.set_processor(PipeFusionFluxAttnProcessor(context, index))

    def patch_block_kwargs(self, call: BlockCall, start: int, end: int, full_lengths: dict[str, int]) -> None:
        rope = call.arg("image_rotary_emb")
        if rope is None:
            return
        n_text = full_lengths["encoder_hidden_states"]

        def rows(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:n_text], x[n_text + start:n_text + end]])

        call.bound.arguments["image_rotary_emb"] = tuple(rows(x) for x in rope) if isinstance(rope, tuple) else rows(rope)

    def install_usp_processors(self, transformer) -> None:
        from xfuser.model_executor.layers.usp_attention import USPFluxAttnProcessor

        for _, block in self.iter_blocks(transformer):
            block.attn.set_processor(USPFluxAttnProcessor())

    def shard_block_kwargs(self, call: BlockCall, rank: int, world: int, full_lengths: dict[str, int]) -> None:
        rope = call.arg("image_rotary_emb")
        if rope is None:
            return
        n_text, n_image = full_lengths["encoder_hidden_states"], full_lengths["hidden_states"]
        t, i = n_text // world, n_image // world

        def local(x: torch.Tensor) -> torch.Tensor:
            # rotary rows follow the joint order [text; image]; keep this rank's rows of each
            return torch.cat([x[rank * t:(rank + 1) * t], x[n_text + rank * i:n_text + (rank + 1) * i]])

        call.bound.arguments["image_rotary_emb"] = tuple(local(x) for x in rope) if isinstance(rope, tuple) else local(rope)

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        return call.block.norm1(call.arg("hidden_states"), emb=call.arg("temb"))[0]
