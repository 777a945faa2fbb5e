"""Attention over stale keys/values for PipeFusion (patch-level pipeline parallel).

A stage computes one latent patch at a time. Its queries are the patch's tokens; its keys and
values are the *whole image*: every attention layer keeps a full-image K/V buffer in which the
current patch refreshes its own rows, while the rows of other patches hold what they were when
those patches last passed (this step for earlier patches, the previous step for later ones).
In a full-image step (PipeFusion's warm-up) the patch is the whole image and the result is
exact attention.

Under hybrid PipeFusion x Ulysses the patch's tokens are also split over the SP ranks; the
Ulysses all-to-all (over heads) runs first, so each rank's buffer holds all rows for its heads.
Text tokens (Flux's joint attention) are never buffered: they are fresh in every call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xfuser.model_executor.layers.projections import flux_out, flux_qkv, self_attention_out, self_attention_qkv


@dataclass
class PatchKVContext:
    """Which image rows the current call covers, and the per-layer K/V buffers of this rank."""

    sp_group: object | None = None  # GroupCoordinator of the SP peers (None / size 1: no SP)
    start: int = 0  # first image token of the current patch (full-image index)
    end: int = 0
    num_tokens: int = 0  # image tokens of the full image
    n_text_local: int = 0  # text rows in front of this rank's local sequence (Flux single blocks)
    kv_only: bool = False  # set by refresh(): processors write this patch's K/V and return None
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def reset(self) -> None:
        self.buffers.clear()

    def set_patch(self, start: int, end: int, num_tokens: int) -> None:
        self.start, self.end, self.num_tokens = start, end, num_tokens

    @property
    def sp_world(self) -> int:
        return 1 if self.sp_group is None else self.sp_group.world_size

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this patch's image keys/values (B, rows, heads, dim) into the layer's buffer and
        return the full-image buffers."""
        full = self.start == 0 and self.end == self.num_tokens
        entry = self.buffers.get(layer)
        shape = (key.shape[0], self.num_tokens, *key.shape[2:])
        if entry is None or tuple(entry[0].shape) != shape or entry[0].dtype != key.dtype:
            if not full:
                raise RuntimeError(
                    "PipeFusion: a patch step found no full-image K/V buffer; run at least one "
                    "full-image warm-up step (--warmup_steps >= 1)"
                )
            entry = (torch.empty(shape, dtype=key.dtype, device=key.device), torch.empty(shape, dtype=value.dtype, device=value.device))
            self.buffers[layer] = entry
        if key.shape[1] != self.end - self.start:
            raise RuntimeError(f"PipeFusion: {key.shape[1]} key rows for patch rows [{self.start}, {self.end})")
        entry[0][:, self.start:self.end] = key
        entry[1][:, self.start:self.end] = value
        return entry

    def refresh(self, run_attention) -> None:
        """Write the current patch's keys/values into the buffers without attending:
        ``run_attention()`` calls a block's self-attention on that block's (modulated) input
        while the processors are in K/V-only mode. Used for a block the cache skips for this
        patch, so that other patches do not read rows that grow older with every skip."""
        self.kv_only = True
        try:
            run_attention()
        finally:
            self.kv_only = False

    def write_kv(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """K/V-only counterpart of :meth:`attend` for image self-attention (no text rows)."""
        if self.sp_world > 1:
            key, value = (self.sp_group.all_to_all(t, scatter_dim=2, gather_dim=1) for t in (key, value))
        self.update(layer, key, value)

    # ------------------------------------------------------------------ the attention core
    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n_text: int, scale: float | None = None
    ) -> torch.Tensor:
        """Local rows ``[text (n_text); image]`` of (B, rows, heads, dim) queries/keys/values ->
        attention output in the same local layout. Keys/values cover all of this rank's patch
        tokens; queries may be a subset (FastCache's motion tokens), equal in count on every
        SP rank."""
        world = self.sp_world
        if world > 1:
            query, key, value = (self.sp_group.all_to_all(t, scatter_dim=2, gather_dim=1) for t in (query, key, value))
        q_text, q_image = _split_rank_major(query, world, n_text)
        k_text, k_image = _split_rank_major(key, world, n_text)
        v_text, v_image = _split_rank_major(value, world, n_text)
        k_full, v_full = self.update(layer, k_image, v_image)
        q = torch.cat([q_text, q_image], dim=1)
        k = torch.cat([k_text, k_full], dim=1)
        v = torch.cat([v_text, v_full], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
        n_text_all = q_text.shape[1]
        out = _join_rank_major(out[:, :n_text_all], out[:, n_text_all:], world)
        if world > 1:
            out = self.sp_group.all_to_all(out, scatter_dim=1, gather_dim=2)
        return out


def _split_rank_major(x: torch.Tensor, world: int, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """After the Ulysses exchange the rows are ``[text_0; image_0; text_1; image_1; ...]`` (one
    chunk per SP rank); return (all text rows, all image rows), each in rank order."""
    if n_text == 0:
        return x[:, :0], x
    chunks = x.chunk(world, dim=1)
    return torch.cat([c[:, :n_text] for c in chunks], dim=1), torch.cat([c[:, n_text:] for c in chunks], dim=1)


def _join_rank_major(text: torch.Tensor, image: torch.Tensor, world: int) -> torch.Tensor:
    if text.shape[1] == 0:
        return image
    return torch.cat([torch.cat(pair, dim=1) for pair in zip(text.chunk(world, dim=1), image.chunk(world, dim=1))], dim=1)


class PipeFusionSelfAttnProcessor:
    """PixArt ``attn1`` (image self-attention, no mask) over the stale full-image K/V.

    ``encoder_hidden_states`` may carry a different key/value source of the same rows
    (FastCache's motion-token queries over all tokens), as in the USP processor."""

    def __init__(self, context: PatchKVContext, layer: int) -> None:
        self.context = context
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None:
            raise NotImplementedError("PipeFusion self-attention supports no mask / group norm / spatial norm")
        query, key, value = self_attention_qkv(attn, hidden_states, encoder_hidden_states)
        if self.context.kv_only:
            return self.context.write_kv(self.layer, key, value)
        out = self.context.attend(self.layer, query, key, value, n_text=0, scale=attn.scale).flatten(2, 3).to(query.dtype)
        return self_attention_out(attn, out, hidden_states)


class PipeFusionHunyuanSelfAttnProcessor:
    """HunyuanDiT ``attn1``: QK LayerNorm and 2D RoPE (rows of this patch / SP rank), keys are
    buffered after the rotation, so stale rows keep their own positions."""

    def __init__(self, context: PatchKVContext, layer: int) -> None:
        self.context = context
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, image_rotary_emb=None):
        if attention_mask is not None or encoder_hidden_states is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("PipeFusion HunyuanDiT self-attention supports no mask / context / group or spatial norm")
        query, key, value = self_attention_qkv(attn, hidden_states, image_rotary_emb=image_rotary_emb)
        if self.context.kv_only:
            return self.context.write_kv(self.layer, key, value)
        out = self.context.attend(self.layer, query, key, value, n_text=0).flatten(2, 3).to(query.dtype)
        return self_attention_out(attn, out, hidden_states)


class PipeFusionFluxAttnProcessor:
    """``FluxAttention``: double-stream blocks pass text as ``encoder_hidden_states``; single-
    stream blocks pass ``[text; image]`` as one sequence (the text length comes from the
    context). The rotary rows handed in match the local ``[text; image]`` rows."""

    def __init__(self, context: PatchKVContext, layer: int) -> None:
        self.context = context
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("PipeFusion Flux attention does not support attention masks")
        if self.context.kv_only:
            raise NotImplementedError("PipeFusion: K/V refresh is not implemented for Flux attention")
        query, key, value, joint = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        n_text = encoder_hidden_states.shape[1] if joint else self.context.n_text_local
        out = self.context.attend(self.layer, query, key, value, n_text=n_text).flatten(2, 3).to(query.dtype)
        return flux_out(attn, out, n_text, joint)
