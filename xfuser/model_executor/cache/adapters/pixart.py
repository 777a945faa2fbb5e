"""PixArt-α/Σ (``BasicTransformerBlock`` with ``ada_norm_single``): one image stream, text as
cross-attention context, timestep modulation from the block's ``scale_shift_table``."""
from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel

from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, Streams, register_adapter


def _modulation(call: BlockCall) -> tuple[torch.Tensor, ...]:
    block, x = call.block, call.arg("hidden_states")
    table = block.scale_shift_table[None] + call.arg("timestep").reshape(x.shape[0], 6, -1)
    return table.chunk(6, dim=1)  # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp


@register_adapter(PixArtTransformer2DModel)
class PixArtAdapter(BlockAdapter):
    family = "pixart"
    block_lists = ("transformer_blocks",)
    streams = ("hidden_states",)
    returns = None
    timestep_arg = "timestep"
    timestep_max = 1000.0
    supports_token_subset = True
    supports_sequence_parallel = True
    sp_split_streams = ("hidden_states",)  # text is cross-attention context: replicated
    supports_pipefusion = True
    image_embedder = "pos_embed"  # patch embedding + absolute position embedding

    def install_pipefusion_processors(self, transformer, context) -> None:
        from xfuser.model_executor.layers.pipefusion_attention import PipeFusionSelfAttnProcessor

        for index, block in self.iter_blocks(transformer):
            block.attn1.set_processor(PipeFusionSelfAttnProcessor(context, index))

    supports_kv_refresh = True

    def patch_self_attention(self, call: BlockCall) -> None:
        call.block.attn1(self.modulated_input(call))

    def prediction_from_output(self, output: torch.Tensor, transformer) -> torch.Tensor:
        if transformer.config.out_channels // 2 == transformer.config.in_channels:  # learned sigma
            return output.chunk(2, dim=1)[0]
        return output

    def install_usp_processors(self, transformer) -> None:
        from xfuser.model_executor.layers.usp_attention import USPSelfAttnProcessor

        for _, block in self.iter_blocks(transformer):
            block.attn1.set_processor(USPSelfAttnProcessor())

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        shift_msa, scale_msa, *_ = _modulation(call)
        return call.block.norm1(call.arg("hidden_states")) * (1 + scale_msa) + shift_msa

    def run_token_subset(self, call: BlockCall, index: torch.Tensor) -> Streams:
        block = call.block
        if block.norm_type != "ada_norm_single" or block.pos_embed is not None or block.only_cross_attention:
            raise NotImplementedError("token subsets implemented for PixArt's ada_norm_single blocks only")
        if call.arg("attention_mask") is not None:
            raise NotImplementedError("token subsets with a self-attention mask are not supported")
        x = call.arg("hidden_states")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(call)
        normed = block.norm1(x) * (1 + scale_msa) + shift_msa  # every token: keys/values need it
        # queries from the selected tokens only, keys/values from ALL tokens
        attn = block.attn1(normed[:, index], encoder_hidden_states=normed)
        h = x[:, index] + gate_msa * attn
        if block.attn2 is not None:
            h = h + block.attn2(
                h,
                encoder_hidden_states=call.arg("encoder_hidden_states"),
                attention_mask=call.arg("encoder_attention_mask"),
            )
        h = h + gate_mlp * block.ff(block.norm2(h) * (1 + scale_mlp) + shift_mlp)
        out = x.clone()
        out[:, index] = h
        return (out,)
