"""Block adapters: one block family's calling convention, written down once as data.

The cache manager never hard-codes a model. It asks the adapter of the transformer's class
(most-derived registered class wins) which ModuleLists hold the blocks, which call arguments
are the hidden-state *streams* a block updates (and in which order it returns them), where the
timestep sits in the transformer's call, what the timestep-modulated input of a block is
(TeaCache reads it), and whether the family can compute a block for a subset of tokens while
attending to all of them (FastCache's spatial token reduction).

The convention is checked against the real block signature when a block is first bound, so a
diffusers API change fails loudly instead of silently caching the wrong tensor.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

Streams = tuple[torch.Tensor, ...]


@dataclass
class BlockCall:
    """One invocation of a block, with its streams pulled out by name."""

    block: nn.Module
    bound: inspect.BoundArguments
    stream_names: tuple[str, ...]
    extra_names: tuple[str, ...]

    @property
    def streams(self) -> Streams:
        return tuple(self.bound.arguments[name] for name in self.stream_names)

    @property
    def extras(self) -> Streams:
        """Read-only tensor inputs that still change the block output (e.g. a long skip)."""
        return tuple(
            self.bound.arguments[name] for name in self.extra_names if self.bound.arguments.get(name) is not None
        )

    def arg(self, name: str, default: Any = None) -> Any:
        return self.bound.arguments.get(name, default)

    def run(self) -> Any:
        return self.block(*self.bound.args, **self.bound.kwargs)

    def rows(self, rows: Sequence[int], batch: int) -> "BlockCall":
        """The same call for batch rows ``rows`` only: every tensor argument whose first
        dimension is the batch (``batch``) is indexed, inside tuples, lists and dicts too;
        per-token tables (rotary embeddings) and scalars pass unchanged. A per-token table as
        long as the batch would be mistaken for a batch tensor, but tokens outnumber samples."""
        index = None

        def pick(value: Any) -> Any:
            nonlocal index
            if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
                if index is None or index.device != value.device:
                    index = torch.tensor(list(rows), dtype=torch.long, device=value.device)
                return value.index_select(0, index)
            if isinstance(value, (tuple, list)):
                return type(value)(pick(v) for v in value)
            if isinstance(value, dict):
                return {k: pick(v) for k, v in value.items()}
            return value

        arguments = {name: pick(value) for name, value in self.bound.arguments.items()}
        bound = inspect.BoundArguments(self.bound.signature, arguments)
        return BlockCall(self.block, bound, self.stream_names, self.extra_names)


class BlockAdapter:
    """Base adapter. Subclasses set the class attributes and override the hooks they support."""

    family: ClassVar[str] = "base"
    #: attribute names of the transformer's block ModuleLists, in execution order
    block_lists: ClassVar[tuple[str, ...]] = ("transformer_blocks",)
    #: block-call parameters holding the hidden-state streams the block updates
    streams: ClassVar[tuple[str, ...]] = ("hidden_states",)
    #: order in which the block returns its streams; None = returns streams[0] alone
    returns: ClassVar[tuple[str, ...] | None] = None
    #: block-call parameters read but not returned that still change the output
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: name of the transformer forward argument carrying the timestep, and its range
    timestep_arg: ClassVar[str] = "timestep"
    timestep_max: ClassVar[float] = 1000.0
    #: published TeaCache rescaling polynomial (highest power first), if any
    tea_coefficients: ClassVar[Sequence[float] | None] = None
    supports_token_subset: ClassVar[bool] = False
    #: streams split across sequence-parallel ranks (the rest are replicated)
    sp_split_streams: ClassVar[tuple[str, ...]] = ("hidden_states",)
    #: whether USP (sequence parallel) is implemented for this family
    supports_sequence_parallel: ClassVar[bool] = False
    #: whether PipeFusion is implemented: every block of the family takes the same call
    #: arguments (so a stage can call its blocks from block 0's arguments) and the image
    #: stream is ``streams[0]`` in row-major token order
    supports_pipefusion: ClassVar[bool] = False
    #: PipeFusion's cross-step overlap re-embeds each latent patch on stage 0: the transformer
    #: submodule that turns the latent input into the image stream, token by token, exactly as
    #: the model's forward does first (checked against the forward at the first overlapped step)
    image_embedder: ClassVar[str | None] = None

    def __init__(self) -> None:
        self._signatures: dict[type, inspect.Signature] = {}

    # ------------------------------------------------------------------ structure
    def blocks(self, transformer: nn.Module) -> list[tuple[nn.ModuleList, int]]:
        """(ModuleList, index) of every block in execution order."""
        out = []
        for attr in self.block_lists:
            blocks = getattr(transformer, attr, None)
            if blocks is None:
                continue
            out.extend((blocks, i) for i in range(len(blocks)))
        if not out:
            raise ValueError(f"{type(transformer).__name__} has none of the block lists {self.block_lists}")
        return out

    def iter_blocks(self, transformer: nn.Module):
        """(index, real block) in execution order, looking through cache wrappers."""
        for index, (blocks, position) in enumerate(self.blocks(transformer)):
            block = blocks[position]
            yield index, getattr(block, "block", block)

    def bind(self, block: nn.Module, args: tuple, kwargs: dict) -> BlockCall:
        sig = self._signatures.get(type(block))
        if sig is None:
            sig = inspect.signature(block.forward)
            missing = [n for n in (*self.streams, *self.extra_inputs) if n not in sig.parameters]
            if missing:
                raise TypeError(
                    f"{self.family} adapter expects {type(block).__name__}.forward to take {missing}; "
                    f"the installed diffusers has {list(sig.parameters)}"
                )
            self._signatures[type(block)] = sig
        bound = sig.bind(*args, **kwargs)
        return BlockCall(block, bound, self.streams, self.extra_inputs)

    def output_streams(self, output: Any) -> Streams:
        """Block return value -> streams in ``self.streams`` order."""
        if self.returns is None:
            return (output,)
        by_name = dict(zip(self.returns, output))
        return tuple(by_name[name] for name in self.streams)

    def pack_output(self, streams: Sequence[torch.Tensor]) -> Any:
        """Streams in ``self.streams`` order -> the block's return format."""
        if self.returns is None:
            return streams[0]
        by_name = dict(zip(self.streams, streams))
        return tuple(by_name[name] for name in self.returns)

    # ------------------------------------------------------------------ per-method hooks
    def normalised_timestep(self, timestep: Any) -> float | None:
        """The transformer's timestep mapped to [0, 1] (1 = pure noise)."""
        if timestep is None:
            return None
        value = timestep.flatten()[0].item() if torch.is_tensor(timestep) else float(timestep)
        return float(value) / self.timestep_max

    def tea_coefficients_for(self, transformer: nn.Module) -> Sequence[float] | None:
        """The published TeaCache polynomial for this checkpoint (variants of one family can
        differ, e.g. CogVideoX-2b / 5b / 1.5); the family's set by default."""
        return self.tea_coefficients

    def modulated_input(self, call: BlockCall) -> torch.Tensor:
        """The timestep-modulated, normalised input of the block (TeaCache's indicator)."""
        raise NotImplementedError(f"{self.family}: TeaCache indicator not implemented")

    # ------------------------------------------------------------------ sequence parallel
    def num_heads(self, transformer: nn.Module) -> int:
        return int(transformer.config.num_attention_heads)

    def install_usp_processors(self, transformer: nn.Module) -> None:
        """Route the self-attention of every block through USP."""
        raise NotImplementedError(f"{self.family}: sequence parallel not implemented")

    def shard_block_kwargs(self, call: BlockCall, rank: int, world: int, full_lengths: dict[str, int]) -> None:
        """Slice per-token call arguments other than the streams (e.g. rotary embeddings)."""

    @staticmethod
    def slice_rotary(call: BlockCall, name: str, rank: int, world: int) -> None:
        """Keep this rank's rows of a per-image-token rotary embedding (tensor or (cos, sin)):
        the image stream is split into ``world`` contiguous chunks, so are its positions."""
        rope = call.arg(name)
        if rope is None:
            return

        def local(x: torch.Tensor) -> torch.Tensor:
            return x.chunk(world, dim=0)[rank]

        call.bound.arguments[name] = tuple(local(x) for x in rope) if isinstance(rope, (tuple, list)) else local(rope)

    # ------------------------------------------------------------------ PipeFusion
    def install_pipefusion_processors(self, transformer: nn.Module, context: Any) -> None:
        """Route every self-attention through the stale-K/V processors of ``context``."""
        raise NotImplementedError(f"{self.family}: PipeFusion not implemented")

    #: whether :meth:`patch_self_attention` is implemented (PipeFusion then refreshes the
    #: stale K/V rows of a block FastCache skips for a patch)
    supports_kv_refresh: ClassVar[bool] = False

    def patch_self_attention(self, call: BlockCall) -> None:
        """Call the block's image self-attention on the input it would see in ``call`` (the
        PipeFusion processors are then in K/V-only mode: nothing is attended or returned)."""
        raise NotImplementedError(f"{self.family}: K/V refresh not implemented")

    def long_skips(self, num_blocks: int) -> dict[int, int]:
        """Consumer block -> producer block of long skip connections the model's own loop wires
        between blocks (passed as the ``skip`` argument); PipeFusion carries them across stages."""
        return {}

    def patch_block_kwargs(self, call: BlockCall, start: int, end: int, full_lengths: dict[str, int]) -> None:
        """Keep the rows of per-token call arguments (rotary embeddings) that belong to image
        tokens ``[start, end)`` (text rows stay); absolute position embeddings need nothing,
        they were added to the full image before the blocks."""

    def prediction_from_output(self, output: torch.Tensor, transformer: nn.Module) -> torch.Tensor:
        """The transformer's output -> what the scheduler steps, as the pipeline's loop derives it
        (models with a learned variance drop those channels); PipeFusion's last stage applies it
        to one patch at a time when it overlaps steps."""
        return output

    def run_token_subset(self, call: BlockCall, index: torch.Tensor) -> Streams:
        """Compute the block for tokens ``index`` of the first stream only, attending to the
        keys/values of *all* tokens; other rows are returned unchanged (the caller fills them)."""
        raise NotImplementedError(f"{self.family}: token subsets not supported")


@dataclass
class _Registry:
    entries: dict[type, type[BlockAdapter]] = field(default_factory=dict)


_registry = _Registry()


def register_adapter(*model_classes: type):
    """Class decorator: ``@register_adapter(PixArtTransformer2DModel)``."""

    def wrap(adapter_cls: type[BlockAdapter]) -> type[BlockAdapter]:
        for cls in model_classes:
            _registry.entries[cls] = adapter_cls
        return adapter_cls

    return wrap


def adapter_for(transformer: nn.Module) -> BlockAdapter:
    """The adapter registered for the most-derived class in ``type(transformer).__mro__``."""
    from xfuser.model_executor.cache import adapters as _  # noqa: F401  (populate registry)

    for cls in type(transformer).__mro__:
        if cls in _registry.entries:
            return _registry.entries[cls]()
    known = sorted(c.__name__ for c in _registry.entries)
    raise ValueError(
        f"no cache adapter for {type(transformer).__name__}; supported transformers: {known}"
    )


def supported_transformers() -> list[str]:
    from xfuser.model_executor.cache import adapters as _  # noqa: F401

    return sorted(c.__name__ for c in _registry.entries)
