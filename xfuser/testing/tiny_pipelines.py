"""Tiny random-weight diffusers pipelines built from configs, offline and deterministic.

For shape, plumbing and equivalence tests only (random weights say nothing about caching
quality; the trained embedded model does). Every transformer has 4 attention heads (Ulysses
degree 2 and 4 possible), at least 2 blocks (Flux: 2 double + 2 single) and an image-token
count divisible by 4 at the size ``tiny_call_kwargs`` asks for. Text encoders are 2-layer,
width 32 (T5 also for Flux's second encoder, HunyuanDiT's second and the video models'), with
the in-memory tokenizers of :mod:`xfuser.testing.tokenizers`. Same seed, same weights.

| type         | transformer                          | blocks | hidden (heads x dim) | call size        | VAE         | image tokens |
|--------------|--------------------------------------|--------|----------------------|------------------|-------------|--------------|
| pixart-sigma | PixArtTransformer2DModel (Σ), patch 4 | 4      | 64 (4 x 16)          | 32 px            | KL 2x       | 16           |
| pixart-alpha | PixArtTransformer2DModel (α), patch 16| 4      | 96 (4 x 24)          | 256 px           | KL 2x       | 64           |
| flux         | FluxTransformer2DModel, 2x2 packing  | 2 + 2  | 64 (4 x 16)          | 16 px            | KL 2x       | 16 (+16 text)|
| hunyuandit   | HunyuanDiT2DModel (long skips), p. 2 | 4      | 32 (4 x 8)           | 64 px            | KL 8x       | 16           |
| cogvideox    | CogVideoXTransformer3DModel, patch 2 | 2      | 32 (4 x 8)           | 32 px x 9 frames | 3-D 4x, t4x | 48 (3 x 16)  |
| consisid     | ConsisIDTransformer3DModel (+ face)  | 2      | 192 (4 x 48)         | 32 px x 9 frames | 3-D 4x, t4x | 48 (3 x 16)  |

Why the odd ones out:

* PixArt-α feeds its resolution/aspect-ratio conditions only when ``sample_size == 128``, hence
  its 256 px canvas (a 16 px patch keeps the token count small) and a hidden size divisible
  by 3 (the condition embeddings split it in thirds).
* Flux is guidance-distilled like FLUX.1-dev (``guidance_embeds``: batch 1, no CFG); its VAE
  carries Flux's ``shift_factor``/``scaling_factor`` (the pipeline's decode needs both).
* HunyuanDiT's pipeline assumes an 8x VAE for its rotary grid, hence a 4-level VAE; it pads
  BERT text to 77 and T5 text to 256 tokens.
* CogVideoX/ConsisID: the video VAE compresses time 4x (9 frames -> 3 latent frames -> 9
  frames decoded), which takes 3 levels and so 4x in space. CogVideoX has no rotary embedding
  (like CogVideoX-2b); ConsisID has one, whose 3-D split needs ``head_dim`` a multiple of 16,
  and its face cross-attention needs ``hidden * 2/3 == LFE_output_dim``: hence 4 x 48. Face
  features are injected after every block (``cross_attn_interval=1``). ConsisID's pipeline
  imports OpenCV (opencv-python-headless) and takes an image plus face embeddings, which
  ``tiny_call_kwargs`` makes synthetically (batch 1; they broadcast over the CFG batch).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from xfuser.logger import init_logger
from xfuser.testing.tokenizers import build_bert_tokenizer, build_clip_tokenizer, build_t5_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = init_logger(__name__)

TINY_MODEL_TYPES = ("pixart-sigma", "pixart-alpha", "flux", "hunyuandit", "cogvideox", "cogvideox1.5", "consisid", "stepvideo")
PROMPT = "a red circle on a blue background, top left"


def _image_vae(seed: int, levels: int, size: int, **extra: Any):
    """KL VAE with ``levels`` blocks, i.e. ``2 ** (levels - 1)`` x spatial compression."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * (levels // 2) + (16,) * (levels - levels // 2),
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1, norm_num_groups=8, sample_size=size, **extra,
    )


def _t5(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=256, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False,
    )).eval()


def _pixart(model_type: str, seed: int):
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    alpha = model_type == "pixart-alpha"
    torch.manual_seed(seed)
    # Σ: 32 px / VAE 2x -> 16x16 latent / patch 4 -> 16 tokens
    # α: 256 px / VAE 2x -> 128x128 latent / patch 16 -> 64 tokens (sample_size 128 feeds its conditions)
    transformer = PixArtTransformer2DModel(
        sample_size=128 if alpha else 16, num_layers=4, attention_head_dim=24 if alpha else 16, num_attention_heads=4,
        in_channels=4, out_channels=8, patch_size=16 if alpha else 4, cross_attention_dim=96 if alpha else 64, caption_channels=32,
        norm_type="ada_norm_single", use_additional_conditions=alpha,
    )
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    return cls(
        tokenizer=build_t5_tokenizer(), text_encoder=_t5(seed + 1), vae=_image_vae(seed + 2, 2, 32), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _flux(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    # 16 px / VAE 2x -> 8x8 latents / Flux's 2x2 packing -> 16 image tokens of 16 channels
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        guidance_embeds=True,  # like FLUX.1-dev: guidance is an input, no CFG batch
    )
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    vae = _image_vae(seed + 2, 2, 32, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
        tokenizer=build_clip_tokenizer(), text_encoder_2=_t5(seed + 3), tokenizer_2=build_t5_tokenizer(),
        transformer=transformer,
    )


def _hunyuandit(seed: int):
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    tokenizer = build_bert_tokenizer(model_max_length=77)
    torch.manual_seed(seed)
    # 64 px / VAE 8x -> 8x8 latent / patch 2 -> 16 tokens
    transformer = HunyuanDiT2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=32,
        num_layers=4, cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16,
        text_len=77, text_len_t5=256,
    )
    torch.manual_seed(seed + 1)
    bert = BertModel(BertConfig(
        vocab_size=len(tokenizer) + 8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )).eval()
    return HunyuanDiTPipeline(
        vae=_image_vae(seed + 2, 4, 64), text_encoder=bert, tokenizer=tokenizer, transformer=transformer,
        scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        text_encoder_2=_t5(seed + 3), tokenizer_2=build_t5_tokenizer(model_max_length=256),
    )


def tiny_video_vae(seed: int):
    """CogVideoX VAE: 3 levels -> 4x space, first two also compress time -> 4x time."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 16), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4, sample_height=32, sample_width=32,
    )


# 32 px / VAE 4x -> 8x8 latent / patch 2 -> 16 tokens per latent frame; 9 frames -> 3 latent frames
_VIDEO_GRID = dict(sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4)


def _cogvideox(seed: int, v15: bool = False):
    """CogVideoX 1.0 (learned-free sincos positions) or 1.5 (3D RoPE, 2-frame temporal patches)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    # 3D RoPE splits a head into t/h/w parts of head_dim/4, 3/8, 3/8: 16 keeps each even
    version = dict(patch_size_t=2, use_rotary_positional_embeddings=True, attention_head_dim=16) if v15 else dict(attention_head_dim=8)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, max_text_seq_length=16, **_VIDEO_GRID, **version,
    )
    return CogVideoXPipeline(
        tokenizer=build_t5_tokenizer(), text_encoder=_t5(seed + 1), vae=tiny_video_vae(seed + 2),
        transformer=transformer, scheduler=CogVideoXDDIMScheduler(),
    )


def _consisid(seed: int):
    from diffusers import CogVideoXDPMScheduler, ConsisIDPipeline, ConsisIDTransformer3DModel

    torch.manual_seed(seed)
    # in_channels 8: noisy latents + image latents (the first frame, zero-padded in time)
    transformer = ConsisIDTransformer3DModel(
        num_attention_heads=4, attention_head_dim=48, in_channels=8, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, max_text_seq_length=16, use_rotary_positional_embeddings=True,
        is_train_face=True, is_kps=False, cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2,
        LFE_id_dim=16, LFE_vit_dim=16, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2,
        LFE_num_querie=4, LFE_output_dim=128, LFE_ff_mult=2, LFE_num_scale=2, **_VIDEO_GRID,
    )
    return ConsisIDPipeline(
        tokenizer=build_t5_tokenizer(), text_encoder=_t5(seed + 1), vae=tiny_video_vae(seed + 2),
        transformer=transformer, scheduler=CogVideoXDPMScheduler(),
    )


def _stepvideo(seed: int):
    from xfuser.testing.tiny_stepvideo import build_tiny_stepvideo_pipeline

    return build_tiny_stepvideo_pipeline(seed)


_BUILDERS: dict[str, Callable[[int], Any]] = {
    "pixart-sigma": lambda seed: _pixart("pixart-sigma", seed),
    "pixart-alpha": lambda seed: _pixart("pixart-alpha", seed),
    "flux": _flux,
    "hunyuandit": _hunyuandit,
    "cogvideox": _cogvideox,
    "cogvideox1.5": lambda seed: _cogvideox(seed, v15=True),
    "consisid": _consisid,
    "stepvideo": _stepvideo,
}


def build_tiny_pipeline(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> "DiffusionPipeline":
    """A tiny random pipeline of ``model_type`` (see TINY_MODEL_TYPES); same seed, same weights."""
    if model_type not in _BUILDERS:
        raise ValueError(f"unknown tiny model type {model_type!r}; choose one of {TINY_MODEL_TYPES}")
    pipe = _BUILDERS[model_type](seed)
    logger.debug("tiny %s: %d transformer parameters", model_type, sum(p.numel() for p in pipe.transformer.parameters()))
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_call_kwargs(model_type: str, seed: int = 0) -> dict[str, Any]:
    """Arguments that run ``build_tiny_pipeline(model_type)`` for 2 steps at its tiny size
    (latent output, CFG on, a fresh seeded generator on every call)."""
    kwargs: dict[str, Any] = dict(
        prompt=PROMPT, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(seed),
    )
    if model_type in ("pixart-sigma", "pixart-alpha"):
        size = 32 if model_type == "pixart-sigma" else 256
        kwargs.update(height=size, width=size, guidance_scale=3.0, use_resolution_binning=False, max_sequence_length=16,
                      clean_caption=False)
    elif model_type == "flux":
        kwargs.update(height=16, width=16, guidance_scale=3.5, max_sequence_length=16)
    elif model_type == "hunyuandit":
        kwargs.update(height=64, width=64, guidance_scale=3.0, use_resolution_binning=False)
    elif model_type in ("cogvideox", "cogvideox1.5"):
        kwargs.update(height=32, width=32, num_frames=9, guidance_scale=3.0, max_sequence_length=16)
    elif model_type == "consisid":
        from PIL import Image

        g = torch.Generator().manual_seed(1000 + seed)
        kwargs.update(
            height=32, width=32, num_frames=9, guidance_scale=3.0, max_sequence_length=16,
            image=Image.new("RGB", (32, 32), (200, 30, 30)),
            # what the face encoders would give: an id embedding (LFE_id_dim) and LFE_num_scale ViT feature maps
            id_cond=torch.randn(1, 16, generator=g), id_vit_hidden=[torch.randn(1, 5, 16, generator=g) for _ in range(2)],
        )
    elif model_type == "stepvideo":
        from xfuser.testing.tiny_stepvideo import tiny_stepvideo_call_kwargs

        kwargs = tiny_stepvideo_call_kwargs(seed)
    else:
        raise ValueError(f"unknown tiny model type {model_type!r}; choose one of {TINY_MODEL_TYPES}")
    return kwargs


def save_tiny_pipeline(model_type: str, path: str | Path, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a tiny pipeline (for from_pretrained / CLI tests)."""
    path = Path(path)
    build_tiny_pipeline(model_type, seed).save_pretrained(path)
    return path


def build_random_pixart_sigma(num_layers: int = 12, hidden: int = 384, heads: int = 6, size: int = 256, seed: int = 0):
    """A PixArt-Σ-architecture pipeline of real depth/width with random weights (for timing
    and overhead measurements at a non-trivial size; quality numbers need a trained model).
    VAE downsamples 8x and the patch is 2, so ``size`` px gives (size/16)² tokens."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=size // 8, num_layers=num_layers, attention_head_dim=hidden // heads, num_attention_heads=heads,
        in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=hidden, caption_channels=32,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )
    return PixArtSigmaPipeline(
        tokenizer=build_t5_tokenizer(), text_encoder=_t5(seed + 1), vae=_image_vae(seed + 2, 4, size), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def calibrate_tiny_fastcache(model_type: str, path: str | Path, steps: int, seed: int = 0, max_gap: int = 3) -> Path:
    """Fit FastCache's learned forecast for ``build_tiny_pipeline(model_type, seed)`` on two
    prompts at its tiny size and save it to ``path`` (tests pass it as ``calibration``)."""
    from xfuser.model_executor.cache.forecast_fit import fit_forecast, record_trajectories

    pipe = build_tiny_pipeline(model_type, seed)
    pipe.set_progress_bar_config(disable=True)
    kwargs = _tiny_call_defaults(model_type)
    trajectories = record_trajectories(pipe, ["a red circle", "a blue square on a white background"], steps, seed=seed, **kwargs)
    return fit_forecast(trajectories, pipe.transformer, max_gap=max_gap).save(path)


def _tiny_call_defaults(model_type: str) -> dict[str, Any]:
    kwargs = tiny_call_kwargs(model_type)
    for key in ("prompt", "generator", "num_inference_steps", "output_type"):
        kwargs.pop(key, None)
    return kwargs


def _register_model_types() -> None:
    """``--model_type tiny-<family>`` and ``pixart-sigma-random`` for the examples and benchmarks:
    registered into the library from here, so the library never imports test code."""
    from xfuser.model_executor.pipelines.model_types import register_model_type

    for family in TINY_MODEL_TYPES:
        register_model_type(
            f"tiny-{family}",
            lambda dtype=torch.float32, _family=family: build_tiny_pipeline(_family, dtype=dtype),
            lambda _family=family: _tiny_call_defaults(_family),
            video=family.startswith(("cogvideox", "consisid", "stepvideo")),
        )
    def random_pixart(dtype: torch.dtype = torch.float32, layers: int = 12, hidden: int = 384):
        pipe = build_random_pixart_sigma(num_layers=layers, hidden=hidden)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)

    register_model_type("pixart-sigma-random", random_pixart)


_register_model_types()
