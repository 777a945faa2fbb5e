"""Sequence parallel on the block path: split the streams before block 0, gather after the
last block. Everything in between (the blocks, the cache method) sees this rank's tokens;
attention reaches the other ranks' tokens through the USP processors.

Embeddings before the blocks and the output head after them run on the full sequence on
every rank (they are cheap and token-wise or need the full image), so the diffusers forward
stays untouched.
"""
from __future__ import annotations

import torch

from xfuser.config.config import ConfigError
from xfuser.core.distributed.group_coordinator import GroupCoordinator
from xfuser.model_executor.cache.adapters.base import BlockAdapter, BlockCall, Streams


class SequenceShard:
    def __init__(self, adapter: BlockAdapter, sp_group: GroupCoordinator, num_blocks: int) -> None:
        self.adapter = adapter
        self.group = sp_group
        self.rank = sp_group.rank_in_group
        self.world = sp_group.world_size
        self.num_blocks = num_blocks
        self.full_lengths: dict[str, int] = {}
        self.split_positions = [adapter.streams.index(n) for n in adapter.sp_split_streams]

    def shard(self, call: BlockCall, index: int) -> BlockCall:
        if index == 0:
            self.full_lengths = {}
            for name in self.adapter.streams:
                tensor = call.bound.arguments[name]
                self.full_lengths[name] = tensor.shape[1]
                if name in self.adapter.sp_split_streams:
                    if tensor.shape[1] % self.world:
                        raise ConfigError(
                            f"{name} has {tensor.shape[1]} tokens, not divisible by the sequence-parallel degree "
                            f"{self.world} (--ulysses_degree x --ring_degree); change the size or the degrees"
                        )
                    call.bound.arguments[name] = tensor.chunk(self.world, dim=1)[self.rank].contiguous()
        self.adapter.shard_block_kwargs(call, self.rank, self.world, self.full_lengths)
        return call

    def gather(self, streams: Streams) -> Streams:
        out = list(streams)
        for pos in self.split_positions:
            out[pos] = self.group.all_gather(out[pos].contiguous(), dim=1)
        return tuple(out)


def check_sequence_parallel(adapter: BlockAdapter, transformer: torch.nn.Module, ulysses: int) -> None:
    """Errors a user can fix, raised before any compute."""
    if not adapter.supports_sequence_parallel:
        raise ConfigError(
            f"sequence parallel (--ulysses_degree/--ring_degree) is not implemented for {type(transformer).__name__}"
        )
    heads = adapter.num_heads(transformer)
    if heads % ulysses:
        raise ConfigError(
            f"{type(transformer).__name__} has {heads} attention heads, not divisible by --ulysses_degree {ulysses}; "
            f"choose a Ulysses degree that divides {heads} (use --ring_degree for the rest)"
        )
