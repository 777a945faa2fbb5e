"""A minimal StepVideo text-to-video pipeline around :class:`StepVideoTransformer3DModel`.

What it does like the reference (stepfun-ai/Step-Video-T2V): two text streams (a causal LLM's
hidden states, padded to ``max_sequence_length`` with a mask, and a CLIP-style encoder's
hidden states, all of whose tokens are kept), latents ``(batch, frames, channels, h, w)``,
flow-matching Euler steps on ``sigmas = linspace(1, 0, steps + 1)`` shifted by the scheduler's
``shift`` (the reference's ``time_shift``, 13 by default), timesteps handed to the
transformer in [0, 1], and classifier-free guidance.

What is different, and why:

* **Not implemented: the official text encoders and VAE.** Step-LLM, Hunyuan-CLIP (a BERT)
  and the Step Video-VAE (16x16 spatial / 8x temporal) are not in diffusers or transformers;
  the reference serves them from a separate process. This pipeline takes any Hugging Face text
  encoders (``text_encoder``: the Step-LLM stand-in, width ``caption_channels[0]``;
  ``text_encoder_2``: the CLIP stand-in, width ``caption_channels[1]``) and any diffusers video
  VAE with the CogVideoX latent convention (``decode`` of ``(batch, channels, frames, h, w)``,
  ``config.scaling_factor``, ``config.temporal_compression_ratio``). So the official
  ``transformer/`` weights load, but a full official generation needs those components ported.
* Latent frames are ``(num_frames - 1) // temporal_ratio + 1`` (the CogVideoX VAE's rule), not
  the reference's ``num_frames // 17 * 3``, which belongs to the Step VAE.
* The CFG batch is ``(uncond, cond)`` in one transformer call (diffusers' order; the reference
  uses ``(cond, uncond)``), so CFG parallel can split it at the transformer boundary.
* The scheduler is diffusers' ``FlowMatchEulerDiscreteScheduler`` given the reference's sigmas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from xfuser.logger import init_logger
from xfuser.model_executor.models.stepvideo.transformer import StepVideoTransformer3DModel

logger = init_logger(__name__)


@dataclass
class StepVideoPipelineOutput(BaseOutput):
    """``frames``: latents (batch, latent_frames, c, h, w) for ``output_type="latent"``, else
    decoded video: np (batch, frames, H, W, 3), pt (batch, frames, 3, H, W) or PIL lists."""

    frames: torch.Tensor | np.ndarray | list


class StepVideoPipeline(DiffusionPipeline):
    """Text-to-video with the StepVideo DiT; see the module docstring for what is not official."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    def __init__(
        self,
        transformer: StepVideoTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        text_encoder_2: Any,
        tokenizer_2: Any,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )
        cfg = self.vae.config
        self.vae_scale_factor_spatial = 2 ** (len(cfg.block_out_channels) - 1)
        self.vae_scale_factor_temporal = int(getattr(cfg, "temporal_compression_ratio", 1))
        self.vae_scale_factor = self.vae_scale_factor_spatial  # what size checks elsewhere read
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------ text
    @staticmethod
    def _encode(tokenizer, encoder, prompts: list[str], max_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        return encoder(ids, attention_mask=mask)[0], mask

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int = 320,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(LLM embeddings, CLIP embeddings, mask over [CLIP tokens; LLM tokens]); with CFG the
        batch is (uncond, cond)."""
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if do_classifier_free_guidance:
            negative = negative_prompt or ""
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            prompts = negatives + prompts
        dtype = self.transformer.dtype
        llm, llm_mask = self._encode(self.tokenizer, self.text_encoder, prompts, max_sequence_length, device)
        clip, _ = self._encode(self.tokenizer_2, self.text_encoder_2, prompts, self.tokenizer_2.model_max_length, device)
        # every CLIP token is attended to (the reference pads the LLM mask with ones for them)
        mask = torch.cat([torch.ones(clip.shape[:2], dtype=llm_mask.dtype, device=device), llm_mask], dim=1)
        return tuple(t.repeat_interleave(num_videos_per_prompt, dim=0) for t in (llm.to(dtype), clip.to(dtype), mask))

    # ------------------------------------------------------------------ latents
    def prepare_latents(
        self, batch_size: int, num_frames: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None, latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        shape = (
            batch_size,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            self.transformer.config.in_channels,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def check_inputs(self, height: int, width: int, num_frames: int) -> None:
        unit = self.vae_scale_factor_spatial * self.transformer.config.patch_size
        if height % unit or width % unit:
            raise ValueError(f"height and width must be multiples of {unit} (VAE {self.vae_scale_factor_spatial}x x patch), got {height}x{width}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(batch, frames, c, h, w) latents -> (batch, 3, frames', H, W) video in [-1, 1]."""
        z = latents.permute(0, 2, 1, 3, 4).to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(z).sample

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 544,
        width: int = 992,
        num_frames: int = 204,
        num_inference_steps: int = 50,
        guidance_scale: float = 9.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        max_sequence_length: int = 320,
    ) -> StepVideoPipelineOutput | tuple:
        """Generate videos. Defaults are the reference's (544x992, 204 frames, 50 steps, guidance 9).

        ``max_sequence_length`` pads/truncates the LLM stream; the CLIP stream uses
        ``tokenizer_2.model_max_length``. With ``guidance_scale > 1`` the (uncond, cond) batch
        goes through the transformer in one call."""
        if prompt is None:
            raise ValueError("prompt is required")
        self.check_inputs(height, width, num_frames)
        device = self._execution_device
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_videos_per_prompt
        do_cfg = guidance_scale > 1.0

        llm, clip, mask = self.encode_prompt(prompt, negative_prompt, do_cfg, num_videos_per_prompt, max_sequence_length, device)
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]  # the reference's schedule, before the shift
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        latents = self.prepare_latents(batch, num_frames, height, width, self.transformer.dtype, device, generator, latents)
        scale_t = float(self.scheduler.config.num_train_timesteps)

        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress:
            for t in self.scheduler.timesteps:
                model_in = torch.cat([latents] * 2) if do_cfg else latents
                timestep = (t / scale_t).expand(model_in.shape[0]).to(model_in.dtype)
                noise_pred = self.transformer(
                    hidden_states=model_in, encoder_hidden_states=llm, encoder_hidden_states_2=clip,
                    encoder_attention_mask=mask, timestep=timestep, return_dict=False,
                )[0]
                if do_cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                progress.update()

        if output_type == "latent":
            frames = latents
        else:
            frames = self.video_processor.postprocess_video(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return StepVideoPipelineOutput(frames=frames)
