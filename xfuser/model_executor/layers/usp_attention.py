"""Attention processors that run the attention core through USP (Ulysses x Ring).

Each processor reproduces the diffusers processor it replaces for the configurations the
supported models use, with one difference: the (batch, tokens, heads, head_dim) attention
call goes to :func:`usp_attention`, so local queries attend to the keys/values of every SP
rank. Unsupported inputs (masks, group norm, ...) raise instead of being ignored.
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from xfuser.core.attention.usp import usp_attention
from xfuser.model_executor.layers.projections import flux_out, flux_qkv, self_attention_out, self_attention_qkv


class USPSelfAttnProcessor:
    """For diffusers ``Attention`` self-attention without masks (PixArt ``attn1``).

    ``encoder_hidden_states`` may carry a different key/value source of this rank's tokens
    (FastCache's motion-token queries over all tokens)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None:
            raise NotImplementedError("USP self-attention supports no mask / group norm / spatial norm")
        if hidden_states.ndim != 3:
            raise NotImplementedError("USP self-attention expects (batch, tokens, channels) inputs")
        query, key, value = self_attention_qkv(attn, hidden_states, encoder_hidden_states)
        out = usp_attention(query, key, value, scale=attn.scale).flatten(2, 3).to(query.dtype)
        return self_attention_out(attn, out, hidden_states)


class USPFluxAttnProcessor:
    """For ``FluxAttention`` (double- and single-stream blocks). Text and image tokens are both
    split across SP ranks; the rotary embedding handed in is this rank's slice of it."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("USP Flux attention does not support attention masks")
        query, key, value, joint = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = usp_attention(query, key, value).flatten(2, 3).to(query.dtype)
        return flux_out(attn, out, encoder_hidden_states.shape[1] if joint else 0, joint)


class USPHunyuanSelfAttnProcessor:
    """For HunyuanDiT's ``attn1``: image self-attention with QK LayerNorm and 2D RoPE; the
    rotary rows handed in are this rank's slice (the adapter slices them per block)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, image_rotary_emb=None):
        if attention_mask is not None or encoder_hidden_states is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("USP HunyuanDiT self-attention supports no mask / context / group or spatial norm")
        query, key, value = self_attention_qkv(attn, hidden_states, image_rotary_emb=image_rotary_emb)
        # HunyuanDiT's own processor uses SDPA's default 1/sqrt(head_dim) scale
        out = usp_attention(query, key, value).flatten(2, 3).to(query.dtype)
        return self_attention_out(attn, out, hidden_states)


class USPCogVideoXAttnProcessor:
    """For CogVideoX / ConsisID joint attention over ``[text; video]``. Both streams are split
    across SP ranks, so each rank's joint sequence is ``[its text rows; its video rows]``; the
    rotary rows handed in are this rank's video slice."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("USP CogVideoX attention does not support attention masks")
        n_text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = self_attention_qkv(attn, joint)  # rotary applies to the video rows only, below
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :n_text], apply_rotary_emb(query[:, n_text:], image_rotary_emb, sequence_dim=1)], dim=1)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :n_text], apply_rotary_emb(key[:, n_text:], image_rotary_emb, sequence_dim=1)], dim=1)
        out = usp_attention(query, key, value).flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, n_text:], out[:, :n_text]
