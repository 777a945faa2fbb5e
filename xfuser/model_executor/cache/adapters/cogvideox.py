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
    # TeaCache (ali-vilab/TeaCache4CogVideoX1.5), highest power first: CogVideoX-5b (also ConsisID)
    tea_coefficients = (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02)
    TEA_2B = (-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03)
    TEA_15_T2V = (2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02)
    TEA_15_I2V = (1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02)
    supports_sequence_parallel = True
    # joint attention over [text; video]: both streams split, each rank attends with its rows of both
    sp_split_streams = ("hidden_states", "encoder_hidden_states")

    def install_usp_processors(self, transformer) -> None:
        from xfuser.model_executor.layers.usp_attention import USPCogVideoXAttnProcessor

        for _, block in self.iter_blocks(transformer):
            block.attn1.set_processor(USPCogVideoXAttnProcessor())

    def shard_block_kwargs(self, call: BlockCall, rank: int, world: int, full_lengths: dict[str, int]) -> None:
        self.slice_rotary(call, "image_rotary_emb", rank, world)  # video rows only

    def tea_coefficients_for(self, transformer) -> tuple[float, ...]:
        """CogVideoX1.5 (temporal patching: ``patch_size_t``; I2V has 32 input channels: noise +
        image latents), CogVideoX-2b (30 heads x 64 = 1920 wide) or CogVideoX-5b (the rest)."""
        cfg = transformer.config
        if getattr(cfg, "patch_size_t", None):
            return self.TEA_15_I2V if cfg.in_channels == 32 else self.TEA_15_T2V
        if cfg.num_attention_heads * cfg.attention_head_dim == 1920:
            return self.TEA_2B
        return self.tea_coefficients

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        return call.block.norm1(call.arg("hidden_states"), call.arg("encoder_hidden_states"), call.arg("temb"))[0]


@register_adapter(ConsisIDTransformer3DModel)
class ConsisIDAdapter(CogVideoXAdapter):
    family = "consisid"

    def tea_coefficients_for(self, transformer) -> tuple[float, ...]:
        return self.tea_coefficients  # TeaCache's ConsisID entry reuses the CogVideoX-5b polynomial
