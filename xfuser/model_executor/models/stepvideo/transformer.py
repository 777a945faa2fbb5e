"""StepVideo (stepfun-ai/Step-Video-T2V) denoiser: a 3-D full-attention DiT, written for xfuser.

Why it lives here: diffusers has no StepVideo model. Config keys and parameter names follow
the official ``transformer/`` checkpoint (``StepVideoModel`` in the reference's
``stepvideo/modules/model.py``), so ``StepVideoTransformer3DModel.from_pretrained(<ckpt>/transformer)``
loads that folder's ``config.json`` and weights as they are.

Architecture (facts of the reference, implemented from scratch):

* latents ``(batch, frames, channels, height, width)`` -> per-frame 2-D patch embedding
  (``pos_embed.proj``, a strided conv) -> one sequence of ``frames * h * w`` tokens (frame
  major, then row, then column);
* adaLN-single timestep modulation (``adaln_single``): timestep in [0, 1] rescaled by 1000,
  256-channel sinusoidal features, an MLP, then one linear to the 6 shift/scale/gate vectors
  shared by every block (each block adds its own ``scale_shift_table``);
* text: the Step-LLM stream (``caption_channels[0]``) goes through a parameter-free
  LayerNorm and a 2-layer GELU(tanh) MLP (``caption_projection``); the CLIP stream
  (``caption_channels[1]``) through one linear (``clip_projection``); the CLIP tokens come
  first. ``encoder_attention_mask`` covers both (CLIP part all ones), and the first
  ``mask.sum()`` text tokens of each sample are attended to;
* blocks: LayerNorm + modulation -> self-attention (fused ``wqkv``, per-head RMSNorm on q/k,
  3-D RoPE) with gate -> cross-attention to the text (``wq``, ``wkv``, q/k RMSNorm), ungated ->
  LayerNorm + modulation -> GELU(tanh) FFN (4x, no biases) with gate;
* head: parameter-free LayerNorm, shift/scale from the embedded timestep and the model's
  ``scale_shift_table``, ``proj_out``, unpatchify.

Departures from the reference, and why:

* RoPE is computed once per forward from the full-sequence ``(frame, row, column)`` positions
  and handed to every block as a per-token ``(cos, sin)`` table (``rotary_emb``), so a
  sequence-parallel rank can be given its rows; the reference derives positions inside each
  attention from its SP rank. The table is computed in float32 and cast to the activations'
  dtype (the reference takes cos/sin of frequencies already cast to that dtype: identical in
  float32, within rounding in bf16).
* The self-attention core is a replaceable function (``set_attention_core``, default
  scaled-dot-product attention); USP is installed by the cache adapter. The ``attention_type``
  config key is kept for checkpoint compatibility but selects nothing.
* ``forward`` returns a diffusers ``Transformer2DModelOutput`` (``.sample``) instead of
  ``{'x': ...}`` and is not wrapped in ``torch.inference_mode``.
* The RoPE channel split is ``(D/2, D/4, D/4)`` of the head dim ``D``; the reference
  hard-codes ``(64, 32, 32)``, which is the same at the official ``D = 128``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from xfuser.logger import init_logger

logger = init_logger(__name__)

AttentionCore = Callable[..., torch.Tensor]
RotaryEmb = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------- attention cores
def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Local full attention on (batch, tokens, heads, head_dim) tensors, the layout
    :func:`xfuser.core.attention.usp.usp_attention` takes, so either can be the core."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------- 3-D RoPE
def rope_channel_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head rotated by frame, row and column position."""
    if head_dim % 8:
        raise ValueError(f"StepVideo's 3-D RoPE needs attention_head_dim divisible by 8, got {head_dim}")
    return head_dim // 2, head_dim // 4, head_dim // 4


def rope_3d_table(
    frames: int, height: int, width: int, split: Sequence[int], theta: float = 1e4, device: torch.device | None = None
) -> RotaryEmb:
    """Per-token ``(cos, sin)``, each ``(frames*height*width, sum(split))`` in float32, for tokens
    ordered frame-major then row then column. Axis ``a`` rotates its ``split[a]`` channels with
    the usual half-split RoPE frequencies ``theta ** (-2i / split[a])``."""
    grids = torch.meshgrid(
        torch.arange(frames, device=device), torch.arange(height, device=device), torch.arange(width, device=device),
        indexing="ij",
    )
    cos, sin = [], []
    for positions, dim in zip(grids, split):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
        angles = positions.reshape(-1).float()[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos.append(angles.cos())
        sin.append(angles.sin())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope_3d(x: torch.Tensor, rotary_emb: RotaryEmb, split: Sequence[int]) -> torch.Tensor:
    """Rotate (batch, tokens, heads, head_dim) ``x`` by the per-token table (tokens, head_dim)."""
    cos, sin = (t.to(x.dtype)[None, :, None, :] for t in rotary_emb)
    halves = []
    for part in x.split(list(split), dim=-1):
        a, b = part.chunk(2, dim=-1)
        halves.append(torch.cat((-b, a), dim=-1))
    return x * cos + torch.cat(halves, dim=-1) * sin


# ---------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 (the q/k norms of both attentions)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class StepVideoSelfAttention(nn.Module):
    """Self-attention over the video tokens. Its core (``attention_core``) is swappable so a
    sequence-parallel runner can route it through USP without touching the projections."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.heads = dim // head_dim
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.rope_split = rope_channel_split(head_dim)
        self.attention_core: AttentionCore = sdpa_attention

    def set_attention_core(self, core: AttentionCore) -> None:
        """``core(query, key, value)`` on (batch, tokens, heads, head_dim) tensors."""
        self.attention_core = core

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary_emb: RotaryEmb | None = None,
        kv_hidden_states: torch.Tensor | None = None,
        kv_rotary_emb: RotaryEmb | None = None,
    ) -> torch.Tensor:
        """With ``kv_hidden_states``, queries come from ``hidden_states`` (a subset of tokens)
        and keys/values from ``kv_hidden_states`` (all tokens), with their own RoPE rows."""
        if kv_hidden_states is None:
            qkv = self.wqkv(hidden_states).unflatten(-1, (self.heads, 3 * self.head_dim))
            q, k, v = qkv.split(self.head_dim, dim=-1)
            kv_rotary_emb = rotary_emb
        else:
            # wqkv's output channels are laid out per head as [q | k | v]
            w = self.wqkv.weight.view(self.heads, 3, self.head_dim, -1)
            q = F.linear(hidden_states, w[:, 0].reshape(-1, w.shape[-1])).unflatten(-1, (self.heads, self.head_dim))
            kv = F.linear(kv_hidden_states, w[:, 1:].reshape(-1, w.shape[-1])).unflatten(-1, (self.heads, 2 * self.head_dim))
            k, v = kv.split(self.head_dim, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        if rotary_emb is not None:
            q = apply_rope_3d(q, rotary_emb, self.rope_split)
            k = apply_rope_3d(k, kv_rotary_emb, self.rope_split)
        out = self.attention_core(q, k, v)
        return self.wo(out.flatten(2).to(hidden_states.dtype))


class StepVideoCrossAttention(nn.Module):
    """Video queries over the (replicated) text tokens; always local."""

    def __init__(self, dim: int, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.heads = dim // head_dim
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q_norm(self.wq(hidden_states).unflatten(-1, (self.heads, self.head_dim)))
        k, v = self.wkv(encoder_hidden_states).unflatten(-1, (self.heads, 2 * self.head_dim)).split(self.head_dim, dim=-1)
        k = self.k_norm(k)
        mask = None if attn_mask is None else attn_mask[:, None, None, :]  # (batch, 1, 1, text): per sample
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.wo(out.transpose(1, 2).flatten(2))


class _GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class StepVideoFeedForward(nn.Module):
    """``net = [GELU(tanh) projection, Identity, Linear]``: the checkpoint's ``ff.net.{0,2}`` names."""

    def __init__(self, dim: int, inner_dim: int | None = None) -> None:
        super().__init__()
        inner_dim = inner_dim or 4 * dim
        self.net = nn.ModuleList([_GELUProjection(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class StepVideoTransformerBlock(nn.Module):
    """One DiT block. The cache manager binds its call by name: the stream is
    ``hidden_states`` and the return value is the updated stream."""

    def __init__(self, dim: int, attention_head_dim: int, norm_eps: float = 1e-5, ff_inner_dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = StepVideoSelfAttention(dim, attention_head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = StepVideoCrossAttention(dim, attention_head_dim)
        self.ff = StepVideoFeedForward(dim, ff_inner_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def modulation(self, timestep: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (batch, 1, dim)."""
        return (self.scale_shift_table[None] + timestep.reshape(-1, 6, self.dim)).chunk(6, dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        rotary_emb: RotaryEmb | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(timestep)
        x = hidden_states
        normed = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn1(normed, rotary_emb=rotary_emb)
        x = x + self.attn2(x, encoder_hidden_states, attn_mask)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)

    def forward_token_subset(
        self,
        index: torch.Tensor,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        rotary_emb: RotaryEmb | None = None,
    ) -> torch.Tensor:
        """The block for token rows ``index`` only, whose queries still attend to the keys and
        values of *every* token (FastCache's motion tokens); other rows are returned unchanged."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(timestep)
        x = hidden_states
        normed = self.norm1(x) * (1 + scale_msa) + shift_msa  # every token: keys/values need it
        rows = None if rotary_emb is None else tuple(t[index] for t in rotary_emb)
        h = x[:, index]
        h = h + gate_msa * self.attn1(normed[:, index], rotary_emb=rows, kv_hidden_states=normed, kv_rotary_emb=rotary_emb)
        h = h + self.attn2(h, encoder_hidden_states, attn_mask)
        h = h + gate_mlp * self.ff(self.norm2(h) * (1 + scale_mlp) + shift_mlp)
        out = x.clone()
        out[:, index] = h
        return out


class PatchEmbed(nn.Module):
    """Per-frame 2-D patches -> tokens (row-major), via a strided conv named ``proj``."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.proj(latent).to(latent.dtype).flatten(2).transpose(1, 2)


class _TimestepSizeEmbeddings(nn.Module):
    """Timestep MLP, plus resolution / frame-count / fps embeddings when the model uses them."""

    def __init__(self, dim: int, size_emb_dim: int, use_additional_conditions: bool = False) -> None:
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
        self.use_additional_conditions = use_additional_conditions
        if use_additional_conditions:
            self.additional_condition_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.resolution_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=size_emb_dim)
            self.nframe_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
            self.fps_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)

    def _condition(self, embedder: nn.Module, value: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return embedder(self.additional_condition_proj(value.flatten()).to(dtype)).reshape(batch, -1)

    def forward(
        self,
        timestep: torch.Tensor,
        resolution: torch.Tensor | None = None,
        nframe: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.timestep_embedder.linear_1.weight.dtype
        emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        if not self.use_additional_conditions:
            return emb
        batch = timestep.shape[0]
        emb = emb + self._condition(self.resolution_embedder, resolution, batch, dtype)
        emb = emb + self._condition(self.nframe_embedder, nframe, batch, dtype)
        if fps is not None:
            emb = emb + self._condition(self.fps_embedder, fps, batch, dtype)
        return emb


class StepVideoAdaLayerNormSingle(nn.Module):
    """adaLN-single: the 6 modulation vectors shared by all blocks, and the embedded timestep
    the output head modulates with. Timesteps arrive in [0, 1] and are rescaled by 1000."""

    def __init__(self, dim: int, use_additional_conditions: bool = False, time_step_rescale: float = 1000.0) -> None:
        super().__init__()
        self.emb = _TimestepSizeEmbeddings(dim, size_emb_dim=dim // 2, use_additional_conditions=use_additional_conditions)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim, bias=True)
        self.time_step_rescale = time_step_rescale

    def forward(self, timestep: torch.Tensor, added_cond_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb(timestep * self.time_step_rescale, **(added_cond_kwargs or {}))
        return self.linear(self.silu(embedded)), embedded


# ---------------------------------------------------------------------------- the model
class StepVideoTransformer3DModel(ModelMixin, ConfigMixin):
    """StepVideo DiT. Config keys are the official ``transformer/config.json`` keys.

    ``forward`` takes latents ``(batch, frames, in_channels, height, width)``, Step-LLM text
    embeddings ``encoder_hidden_states`` (batch, L, caption_channels[0]), CLIP embeddings
    ``encoder_hidden_states_2`` (batch, L2, caption_channels[1]), a timestep in [0, 1] per
    sample and ``encoder_attention_mask`` (batch, L2 + L) over the concatenated text.
    """

    _no_split_modules = ["StepVideoTransformerBlock", "PatchEmbed"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 48,
        attention_head_dim: int = 128,
        in_channels: int = 64,
        out_channels: int | None = 64,
        num_layers: int = 48,
        dropout: float = 0.0,
        patch_size: int = 1,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        use_additional_conditions: bool | None = False,
        caption_channels: int | Sequence[int] | None = (6144, 1024),
        attention_type: str | None = "parallel",
    ) -> None:
        super().__init__()
        if norm_type != "ada_norm_single":
            raise ValueError(f"StepVideo supports norm_type='ada_norm_single' only, got {norm_type!r}")
        if dropout:
            logger.warning("StepVideo: dropout=%s is ignored (inference only)", dropout)
        inner = num_attention_heads * attention_head_dim
        self.inner_dim = inner
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.use_additional_conditions = bool(use_additional_conditions)
        self.rope_split = rope_channel_split(attention_head_dim)

        self.pos_embed = PatchEmbed(patch_size, in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [StepVideoTransformerBlock(inner, attention_head_dim) for _ in range(num_layers)]
        )
        self.norm_out = nn.LayerNorm(inner, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.scale_shift_table = nn.Parameter(torch.randn(2, inner) / inner**0.5)
        self.proj_out = nn.Linear(inner, patch_size * patch_size * self.out_channels)
        self.adaln_single = StepVideoAdaLayerNormSingle(inner, use_additional_conditions=self.use_additional_conditions)

        if isinstance(caption_channels, int):
            caption_channel = caption_channels
        else:
            caption_channel, clip_channel = caption_channels
            self.clip_projection = nn.Linear(clip_channel, inner)
        self.caption_norm = nn.LayerNorm(caption_channel, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.caption_projection = PixArtAlphaTextProjection(in_features=caption_channel, hidden_size=inner, act_fn="gelu_tanh")

    # ------------------------------------------------------------------ pieces of forward
    def rotary_embedding(self, frames: int, height: int, width: int, device: torch.device) -> RotaryEmb:
        """Per-token (cos, sin) of the full token grid (in patches); every block gets it."""
        return rope_3d_table(frames, height, width, self.rope_split, device=device)

    @staticmethod
    def _text_and_mask(text: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep the first ``mask.sum()`` text tokens of each sample (as the reference does):
        trim to the longest and mask the rest."""
        if mask is None:
            return text, None
        lengths = mask.sum(dim=1).long()
        keep = int(lengths.max())  # one host read per forward
        valid = torch.arange(keep, device=text.device)[None, :] < lengths[:, None]
        return text[:, :keep], valid

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_2: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be (batch, frames, channels, height, width), got {tuple(hidden_states.shape)}")
        if encoder_hidden_states is None or timestep is None:
            raise ValueError("StepVideo needs encoder_hidden_states and timestep")
        batch, frames, _, height, width = hidden_states.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size {p}")
        h, w = height // p, width // p

        x = self.pos_embed(hidden_states.flatten(0, 1))  # (batch*frames, h*w, inner)
        x = x.unflatten(0, (batch, frames)).flatten(1, 2)  # (batch, frames*h*w, inner)

        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1)
        if timestep.numel() == 1 and batch > 1:
            timestep = timestep.expand(batch)
        added = {}
        if self.use_additional_conditions:
            added = dict(added_cond_kwargs or {})
            added.setdefault("resolution", torch.tensor([(h, w)] * batch, device=x.device, dtype=x.dtype))
            added.setdefault("nframe", torch.tensor([frames] * batch, device=x.device, dtype=x.dtype))
            added.setdefault("fps", fps)
        modulation, embedded_timestep = self.adaln_single(timestep, added_cond_kwargs=added)

        text = self.caption_projection(self.caption_norm(encoder_hidden_states))
        if encoder_hidden_states_2 is not None and hasattr(self, "clip_projection"):
            text = torch.cat([self.clip_projection(encoder_hidden_states_2), text], dim=1)
        text, text_mask = self._text_and_mask(text, encoder_attention_mask)
        rotary_emb = self.rotary_embedding(frames, h, w, x.device)

        for block in self.transformer_blocks:
            x = block(hidden_states=x, encoder_hidden_states=text, timestep=modulation, attn_mask=text_mask, rotary_emb=rotary_emb)

        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        # unpatchify: (b, f*h*w, p*p*c) -> (b, f, c, h*p, w*p)
        x = x.reshape(batch, frames, h, w, p, p, self.out_channels).permute(0, 1, 6, 2, 4, 3, 5)
        output = x.reshape(batch, frames, self.out_channels, h * p, w * p)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
