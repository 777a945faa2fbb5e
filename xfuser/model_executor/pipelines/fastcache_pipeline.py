"""``xFuserFastCachePipelineWrapper``: turn caching on for any supported diffusers pipeline.

    wrapper = xFuserFastCachePipelineWrapper(pipe)
    wrapper.enable_fastcache(cache_ratio_threshold=0.05, motion_threshold=0.1)
    image = wrapper(prompt="...", num_inference_steps=20).images[0]
    stats = wrapper.get_cache_statistics()

The wrapper never patches the pipeline class (a second engine in the same process would
inherit it); it installs a :class:`CacheManager` on this pipeline's transformer instance and
resets it at the start of every call, so two identical calls give identical images.
"""
from __future__ import annotations

from typing import Any

from xfuser.config.config import CacheConfig, ConfigError
from xfuser.logger import init_logger
from xfuser.memory import PeakMemory, peak_memory, reset_peak_memory
from xfuser.model_executor.cache.adapters.base import BlockAdapter, adapter_for
from xfuser.model_executor.cache.manager import CacheManager, check_installable
from xfuser.model_executor.cache.sync import SyncGroup
from xfuser.model_executor.pipelines.call_args import (
    keyword_call,
    prepare_call_kwargs,
    requested_samples,
    schedule_length_of,
    scheduled_steps,
)
from xfuser.model_executor.pipelines.input_checks import check_call_inputs
from xfuser.model_executor.pipelines.input_warnings import warn_unusual_inputs
from xfuser.timing import model_device

logger = init_logger(__name__)


def _transformer_of(pipe) -> Any:
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no `transformer`: only DiT pipelines can be cached")
    return transformer


def check_method_supported(transformer, config: CacheConfig) -> BlockAdapter:
    """Raise before any compute when the model cannot run ``config.method``."""
    try:
        adapter = adapter_for(transformer)
    except ValueError as exc:
        raise ConfigError(f"--cache_method {config.method}: {exc}") from exc
    if config.method == "Tea" and type(adapter).modulated_input is BlockAdapter.modulated_input:
        raise ConfigError(
            f"--cache_method Tea is not supported for {type(transformer).__name__}: its adapter has no "
            "timestep-modulated input; use Fast or Fb"
        )
    return adapter


class xFuserFastCachePipelineWrapper:  # noqa: N801 - public name fixed by the seed API
    """Wraps a diffusers DiT pipeline; attribute access falls through to the pipeline."""

    def __init__(self, pipe, sync: SyncGroup | None = None) -> None:
        self.pipe = pipe
        self.sync = sync
        self.manager: CacheManager | None = None
        self.cache_config: CacheConfig | None = None
        self.peak_memory: PeakMemory | None = None

    # ------------------------------------------------------------------ enabling
    def enable_fastcache(
        self,
        cache_ratio_threshold: float = 0.05,
        motion_threshold: float = 0.1,
        significance_level: float = 0.05,
        **kwargs: Any,
    ) -> "xFuserFastCachePipelineWrapper":
        """FastCache with the seed's knobs (see docs/methods/fastcache.md for their effect)."""
        return self.enable_cache(
            "Fast",
            cache_ratio_threshold=cache_ratio_threshold,
            motion_threshold=motion_threshold,
            significance_level=significance_level,
            **kwargs,
        )

    def enable_cache(self, method: str | None = "Fast", **kwargs: Any) -> "xFuserFastCachePipelineWrapper":
        """Enable ``method`` (``Fast``, ``Fb``, ``Tea`` or ``None``); keyword arguments are
        :class:`CacheConfig` fields. Everything is validated before the next call computes."""
        config = kwargs.pop("config", None) or CacheConfig(method=method, **kwargs)
        transformer = _transformer_of(self.pipe)
        check_method_supported(transformer, config)
        self.disable_cache()
        check_installable(transformer)
        self.cache_config = config
        self.manager = CacheManager(transformer, config, sync=self.sync, schedule_length=schedule_length_of(self.pipe)).install()
        logger.info("cache %s enabled on %s (%d blocks)", config.method, type(transformer).__name__, self.manager.num_blocks)
        return self

    def disable_cache(self) -> None:
        """Restore the original blocks; later calls run uncached."""
        if self.manager is not None:
            self.manager.uninstall()
        self.manager = None

    def close(self) -> None:
        """Undo everything the wrapper installed: the pipeline is as it was, and another wrapper
        or an ``xDiTParallel`` may take it."""
        self.disable_cache()

    def __enter__(self) -> "xFuserFastCachePipelineWrapper":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ running
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the pipeline with the call arguments prepared as the CLI prepares them (the
        model's native size and shipped call defaults where the caller gave none, resolution
        binning off where the pipeline would reject that size), checked before compute."""
        call = keyword_call(self.pipe, args, kwargs)
        if call is not None:
            args, kwargs = (), prepare_call_kwargs(self.pipe, call.pop("height", None), call.pop("width", None), **call)
            check_call_inputs(self.pipe, kwargs)
            warn_unusual_inputs(self.pipe, kwargs)
        if self.manager is not None:
            steps = scheduled_steps(self.pipe, args, kwargs)
            if steps is not None and steps < 1:
                raise ConfigError(f"num_inference_steps={steps}: a generation needs at least one step")
            self.manager.reset(steps, requested_samples(self.pipe, args, kwargs))
        device = model_device(self.pipe)
        reset_peak_memory(device)
        result = self.pipe(*args, **kwargs)
        self.peak_memory = peak_memory(device)
        if self.manager is not None and self.manager.debug_agreement:
            self.manager.sync.verify_same(self.manager.decision_log())
        return result

    def get_cache_statistics(self) -> dict[str, Any]:
        """Plain-data statistics of the last call, with its peak memory (empty dict when
        caching is off)."""
        if self.manager is None:
            return {}
        stats = self.manager.statistics()
        if self.peak_memory is not None:
            stats["peak_memory"] = self.peak_memory.as_dict()
        return stats

    def __getattr__(self, name: str) -> Any:
        if name == "pipe":  # during unpickling / before __init__
            raise AttributeError(name)
        return getattr(self.pipe, name)
