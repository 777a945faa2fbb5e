"""HunyuanDiT: one image stream; blocks in the second half also read a long skip connection
from the first half, so the skip is an extra input of the change metric. Under sequence
parallel the skips are block outputs, hence already this rank's tokens."""
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
    supports_sequence_parallel = True
    sp_split_streams = ("hidden_states",)  # text is cross-attention context: replicated

    def install_usp_processors(self, transformer) -> None:
        from xfuser.model_executor.layers.usp_attention import USPHunyuanSelfAttnProcessor

        for _, block in self.iter_blocks(transformer):
            block.attn1.set_processor(USPHunyuanSelfAttnProcessor())

    supports_pipefusion = True
    image_embedder = "pos_embed"

    supports_kv_refresh = True

    def patch_self_attention(self, call: BlockCall) -> None:
        block, x = call.block, call.arg("hidden_states")
        if block.skip_linear is not None:  # second-half blocks fuse the long skip first
            x = block.skip_linear(block.skip_norm(torch.cat([x, call.arg("skip")], dim=-1)))
        block.attn1(block.norm1(x, call.arg("temb")), image_rotary_emb=call.arg("image_rotary_emb"))

    def prediction_from_output(self, output: torch.Tensor, transformer) -> torch.Tensor:
        return output.chunk(2, dim=1)[0]  # the pipeline always drops the learned-sigma half

    def install_pipefusion_processors(self, transformer, context) -> None:
        from xfuser.model_executor.layers.pipefusion_attention import PipeFusionHunyuanSelfAttnProcessor

        for index, block in self.iter_blocks(transformer):
            block.attn1.set_processor(PipeFusionHunyuanSelfAttnProcessor(context, index))

    def long_skips(self, num_blocks: int) -> dict[int, int]:
        # diffusers' loop pushes the outputs of blocks 0 .. N/2-2 and pops them, last first, into
        # blocks N/2+1 .. N-1: block c reads the output of block N-1-c
        return {c: num_blocks - 1 - c for c in range(num_blocks // 2 + 1, num_blocks)}

    def patch_block_kwargs(self, call: BlockCall, start: int, end: int, full_lengths: dict[str, int]) -> None:
        rope = call.arg("image_rotary_emb")  # image rows only
        if rope is not None:
            call.bound.arguments["image_rotary_emb"] = tuple(x[start:end] for x in rope) if isinstance(rope, tuple) else rope[start:end]

    def shard_block_kwargs(self, call: BlockCall, rank: int, world: int, full_lengths: dict[str, int]) -> None:
        # attn1 rotates queries and keys, attn2 rotates the image queries: both get this rank's rows
        self.slice_rotary(call, "image_rotary_emb", rank, world)

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        return call.block.norm1(call.arg("hidden_states"), call.arg("temb"))
