"""StepVideo (``StepVideoTransformer3DModel``): one video-token stream; text is cross-attention
context (replicated under sequence parallel). Blocks take a per-token 3-D RoPE table
(``rotary_emb``, rows in token order) computed from the full sequence, so a sequence-parallel
rank gets its rows of it. Timesteps arrive in [0, 1]. No published TeaCache polynomial
exists for StepVideo: fit one with the calibrate command (the identity is used otherwise).
"""
from __future__ import annotations

import torch

from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, Streams, register_adapter
from xfuser.model_executor.models.stepvideo.transformer import StepVideoTransformer3DModel


@register_adapter(StepVideoTransformer3DModel)
class StepVideoAdapter(BlockAdapter):
    family = "stepvideo"
    block_lists = ("transformer_blocks",)
    streams = ("hidden_states",)
    returns = None
    timestep_arg = "timestep"
    timestep_max = 1.0
    tea_coefficients = None
    supports_token_subset = True
    supports_sequence_parallel = True
    sp_split_streams = ("hidden_states",)  # text is cross-attention context: replicated

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        block = call.block
        shift_msa, scale_msa, *_ = block.modulation(call.arg("timestep"))
        return block.norm1(call.arg("hidden_states")) * (1 + scale_msa) + shift_msa

    def install_usp_processors(self, transformer) -> None:
        """Self-attention cores -> USP; cross-attention to the replicated text stays local."""
        from xfuser.core.attention.usp import usp_attention

        for _, block in self.iter_blocks(transformer):
            block.attn1.set_attention_core(usp_attention)

    def shard_block_kwargs(self, call: BlockCall, rank: int, world: int, full_lengths: dict[str, int]) -> None:
        """This rank's contiguous rows of the RoPE table, matching its chunk of ``hidden_states``."""
        rope = call.arg("rotary_emb")
        n = full_lengths["hidden_states"]
        if rope is None or rope[0].shape[0] != n:
            return  # absent, or already this rank's rows
        per = n // world
        call.bound.arguments["rotary_emb"] = tuple(t[rank * per:(rank + 1) * per] for t in rope)

    def run_token_subset(self, call: BlockCall, index: torch.Tensor) -> Streams:
        return (call.block.forward_token_subset(index, **call.bound.arguments),)
