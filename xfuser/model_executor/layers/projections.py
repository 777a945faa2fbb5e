"""Projections around the attention core of diffusers attention modules, shared by the USP and
PipeFusion processors: they differ only in the core (USP's all-to-all / ring vs attention
over stale full-image keys/values), so the query/key/value and output projections live here
once. Unsupported inputs raise in the processors, not here."""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb


def self_attention_qkv(attn, hidden_states: torch.Tensor, kv_source: torch.Tensor | None = None,
                       image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, tokens, heads, head_dim) queries of ``hidden_states`` and keys/values of
    ``kv_source`` (default: the same tokens), QK-normalised and rotated when the module does."""
    kv_source = hidden_states if kv_source is None else kv_source
    query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
    key = attn.to_k(kv_source).unflatten(-1, (attn.heads, -1))
    value = attn.to_v(kv_source).unflatten(-1, (attn.heads, -1))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


def self_attention_out(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Output projection, residual connection and rescale of a diffusers ``Attention``."""
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def flux_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
             image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``FluxAttention`` queries/keys/values over ``[text; image]`` rows (double-stream blocks
    pass text separately: ``joint`` is True) or over the one given sequence (single-stream)."""
    if getattr(attn, "fused_projections", False):
        raise NotImplementedError("Flux attention processors here expect unfused projections")
    query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
    value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    if joint:
        eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
        ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key, value = (torch.cat(p, dim=1) for p in ((eq, query), (ek, key), (ev, value)))
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value, joint


def flux_out(attn, out: torch.Tensor, n_text: int, joint: bool):
    """Split ``[text; image]`` and project each (double-stream); single-stream returns as is."""
    if not joint:
        return out
    text, image = out[:, :n_text], out[:, n_text:]
    image = attn.to_out[1](attn.to_out[0](image.contiguous()))
    return image, attn.to_add_out(text.contiguous())
