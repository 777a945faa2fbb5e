"""A tiny random StepVideo (transformer, text encoders, tokenizers, VAE) for the test suite and
the ``tiny-stepvideo`` model type: test code, kept out of the model package it exercises."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from xfuser.model_executor.models.stepvideo.pipeline import StepVideoPipeline
from xfuser.model_executor.models.stepvideo.transformer import StepVideoTransformer3DModel
from xfuser.testing.tiny_pipelines import tiny_video_vae
from xfuser.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

PROMPT = "a red circle on a blue background, top left"

TINY_STEPVIDEO_CONFIG: dict[str, Any] = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2, patch_size=2,
    caption_channels=[32, 32], attention_type="parallel",
)


def build_tiny_stepvideo_transformer(seed: int = 0) -> StepVideoTransformer3DModel:
    """2 blocks, 2 heads x 16 dims, patch 2, 4 latent channels, text widths 32/32: for tests
    only (random weights). Same seed, same weights."""
    torch.manual_seed(seed)
    return StepVideoTransformer3DModel(**TINY_STEPVIDEO_CONFIG).eval()


def build_tiny_stepvideo_pipeline(seed: int = 0) -> StepVideoPipeline:
    """Tiny random StepVideo pipeline, offline: the tiny transformer (2 blocks, 2 heads x 16),
    a 2-layer T5 encoder (width 32) standing in for Step-LLM, a 2-layer CLIP text model
    (width 32) standing in for Hunyuan-CLIP, in-memory tokenizers, a tiny CogVideoX VAE and
    ``FlowMatchEulerDiscreteScheduler(shift=13)``. Same seed, same weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = build_tiny_stepvideo_transformer(seed)
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False,
    )).eval()
    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    return StepVideoPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=13.0), vae=tiny_video_vae(seed + 3).eval(),
        text_encoder=t5, tokenizer=build_t5_tokenizer(), text_encoder_2=clip, tokenizer_2=build_clip_tokenizer(model_max_length=16),
    )


def tiny_stepvideo_call_kwargs(seed: int = 0) -> dict[str, Any]:
    """2 steps at 32x32 px, 9 frames (3 latent frames x 4x4 patches = 48 video tokens), CFG on,
    latent output, a fresh seeded generator on every call."""
    return dict(
        prompt=PROMPT, num_inference_steps=2, height=32, width=32, num_frames=9, guidance_scale=3.0,
        max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(seed),
    )
