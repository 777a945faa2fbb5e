"""``--use_torch_compile``: regional compilation of the transformer blocks.

A DiT is one block class repeated N times, so compiling each block in place (the way
diffusers' ``compile_repeated_blocks`` does) traces the block once and reuses the graph for
every instance: dynamo treats the parameters of inlined ``nn.Module``s as inputs, so the
blocks share one compiled graph and the cost does not grow with depth. Everything the engine
decides between blocks — cache decisions (host reads), sequence-parallel splits and gathers,
PipeFusion's patch hand-offs — happens in :class:`~xfuser.model_executor.cache.manager.CachedBlock`,
which wraps the compiled block and stays eager: a cache decision never causes a
recompilation, and no block has a graph break on the single-process or CFG path.

Inside a block only the attention core of USP (yunchang's all-to-all / ring exchange) is
kept out of the graph (:func:`torch.compiler.disable` on the kernel call), so under USP each
block is two graphs around the exchange. Token-reduced FastCache blocks run a block's
submodules on a subset of rows; those calls are eager (they are the cheap path).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from xfuser.config.config import ConfigError
from xfuser.logger import init_logger
from xfuser.model_executor.cache.adapters.base import BlockAdapter, adapter_for

logger = init_logger(__name__)

#: dynamo recompiles a graph when its input shapes change; the engine sees a handful of shapes
#: per generation (full image / PipeFusion patch / cond+uncond vs split), so it marks them
#: dynamic after the first change instead of compiling one graph per size.
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": False, "dynamic": None}


def _raw_block(module: nn.Module) -> nn.Module:
    """The model's own block (a CachedBlock keeps it as ``.block``)."""
    from xfuser.model_executor.cache.manager import CachedBlock

    return module.block if isinstance(module, CachedBlock) else module


def check_compilable() -> None:
    """Refuse before any compute when this torch cannot compile (no dynamo, or no inductor
    backend for the platform): ``--use_torch_compile`` must never silently run eager."""
    import torch

    if not hasattr(torch, "compile") or not hasattr(torch, "compiler"):
        raise ConfigError("--use_torch_compile needs torch >= 2.1 (torch.compile); upgrade torch or drop the flag")
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError("--use_torch_compile: torch.compile is not supported on this Python/platform; drop the flag")


def compile_blocks(transformer: nn.Module, adapter: BlockAdapter | None = None, **options: Any) -> int:
    """Compile every transformer block in place; returns how many were compiled.

    Works before or after a CacheManager is installed (the wrapper is skipped, its block is
    compiled). Idempotent: a block compiled already is left alone."""
    check_compilable()
    adapter = adapter or adapter_for(transformer)
    kwargs = {**COMPILE_OPTIONS, **options}
    count = 0
    for blocks, position in adapter.blocks(transformer):
        block = _raw_block(blocks[position])
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(**kwargs)
        count += 1
    logger.info("torch.compile: %d %s blocks compiled regionally", count, adapter.family)
    return count


def is_compiled(transformer: nn.Module, adapter: BlockAdapter | None = None) -> bool:
    adapter = adapter or adapter_for(transformer)
    return all(getattr(_raw_block(b[i]), "_compiled_call_impl", None) is not None for b, i in adapter.blocks(transformer))
