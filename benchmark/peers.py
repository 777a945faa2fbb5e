"""Other projects' caches on the same pipeline, prompts and seeds: the benchmark's peers.

Each peer is set up through its own library's public entry point and torn down after its
runs, so the uncached reference and our methods never see its hooks:

* diffusers' built-in hooks (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``,
  ``PyramidAttentionBroadcastConfig``). They are meant for models with ``CacheMixin`` and
  pipelines that open a ``cache_context`` around every denoiser call; PixArt has neither, so
  :class:`DiffusersHookPeer` mixes ``CacheMixin`` into the transformer's class for the peer's
  runs (diffusers' own enable/disable code then runs unchanged) and opens the context from a
  forward pre-hook (one context for the batched uncond+cond call: one call per step).
* cache-dit's DBCache (``cache_dit.enable_cache`` with ``DBCacheConfig``), optional: when
  the package is missing the peer is reported as skipped with the install command.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Peer:
    """One configured peer cache: ``enable(pipe)`` before its runs, ``disable(pipe)`` after."""

    method: str
    threshold: float
    enable: Callable[[Any], None]
    disable: Callable[[Any], None]
    reset: Callable[[Any], None] = lambda pipe: None

    @property
    def label(self) -> str:
        return f"{self.method} {self.threshold:g}"


class DiffusersHookPeer:
    """Applies a diffusers cache config with ``CacheMixin``'s methods, for any transformer."""

    def __init__(self, config_factory: Callable[[Any], Any]) -> None:
        self.config_factory = config_factory
        self._handles: list[Any] = []
        self.timestep: int = 999

    def enable(self, pipe: Any) -> None:
        from diffusers.models.cache_utils import CacheMixin

        transformer = pipe.transformer
        self._original_class = None
        if not isinstance(transformer, CacheMixin):
            self._original_class = type(transformer)
            transformer.__class__ = type(self._original_class.__name__, (self._original_class, CacheMixin), {})
            transformer._cache_config = None  # the attribute CacheMixin keeps
        transformer.enable_cache(self.config_factory(self))
        self._handles = [
            transformer.register_forward_pre_hook(self._enter, with_kwargs=True),
            transformer.register_forward_hook(self._exit),
        ]

    def _enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        t = kwargs.get("timestep")
        if torch.is_tensor(t):
            self.timestep = int(t.flatten()[0].item())
        _set_cache_context(module, CacheContext("cond_uncond"))

    def _exit(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(module, None)

    def reset(self, pipe: Any) -> None:
        """Fresh per-generation state (diffusers resets it only through pipelines that ask)."""
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(pipe.transformer).reset_stateful_hooks(recurse=True)

    def disable(self, pipe: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        pipe.transformer.disable_cache()
        if self._original_class is not None:
            pipe.transformer.__class__ = self._original_class


def diffusers_peers(thresholds: list[float], block_lists: tuple[str, ...] = ("transformer_blocks",)) -> list[Peer]:
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    # TaylorSeer's default patterns (``^transformer_blocks.*attn`` with re.fullmatch) match no
    # module of PixArt (``attn1``/``attn2``): forecast whole blocks instead
    whole_blocks = [rf"^{name}\.\d+$" for name in block_lists]
    peers = []
    for threshold in thresholds:
        hook = DiffusersHookPeer(lambda _, th=threshold: FirstBlockCacheConfig(threshold=th))
        peers.append(Peer("diffusers-FBCache", threshold, hook.enable, hook.disable, hook.reset))
    for interval in (2, 3):
        # TaylorSeer: full compute every `interval` steps, first-order Taylor forecast between
        hook = DiffusersHookPeer(
            lambda _, n=interval: TaylorSeerCacheConfig(
                cache_interval=n, disable_cache_before_step=2, max_order=1, taylor_factors_dtype=torch.float32,
                cache_identifiers=whole_blocks,
            )
        )
        peers.append(Peer("diffusers-TaylorSeer", float(interval), hook.enable, hook.disable, hook.reset))
    for skip in (2, 3):
        # Pyramid Attention Broadcast: reuse self-attention outputs for `skip` steps mid-schedule
        hook = DiffusersHookPeer(
            lambda h, n=skip: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: h.timestep,
            )
        )
        peers.append(Peer("diffusers-PAB", float(skip), hook.enable, hook.disable, hook.reset))
    return peers


def cache_dit_available() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


def cache_dit_peers(thresholds: list[float], num_blocks: int) -> list[Peer]:
    """DBCache with Fn=1 compute block in front and Bn=0 behind (F1B0), which suits small
    models: larger Fn/Bn leave nothing to skip on an 8-block transformer."""
    import cache_dit

    def make(threshold: float) -> Peer:
        def enable(pipe: Any) -> None:
            cache_dit.enable_cache(
                pipe,
                cache_config=cache_dit.DBCacheConfig(
                    Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=2,
                ),
            )

        def disable(pipe: Any) -> None:
            cache_dit.disable_cache(pipe)

        return Peer("cache-dit-DBCache", threshold, enable, disable)

    if num_blocks < 2:
        raise ValueError("DBCache F1B0 needs at least 2 transformer blocks")
    return [make(t) for t in thresholds]


def available_peers(pipe: Any, thresholds: list[float]) -> tuple[list[Peer], list[dict[str, str]]]:
    """Peers runnable here, and a {name, reason} entry for each one that is not."""
    from xfuser.model_executor.cache.adapters import adapter_for

    peers, skipped = [], []
    try:
        peers += diffusers_peers(thresholds, adapter_for(pipe.transformer).block_lists)
    except ImportError as exc:
        skipped.append({"name": "diffusers cache hooks", "reason": f"not available in this diffusers: {exc}"})
    if cache_dit_available():
        num_blocks = len(getattr(pipe.transformer, "transformer_blocks", []))
        peers += cache_dit_peers(thresholds, num_blocks)
    else:
        skipped.append({"name": "cache-dit DBCache", "reason": "not installed (pip install cache-dit==1.5.3)"})
    return peers, skipped
