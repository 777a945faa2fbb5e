"""Other projects' caches on the same pipeline, prompts and seeds: the benchmark's peers.

Each peer is set up through its own library's public entry point and torn down after its
runs, so the uncached reference and our methods never see its hooks:

* diffusers' built-in hooks (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``,
  ``PyramidAttentionBroadcastConfig``, ``MagCacheConfig``). They are meant for models with ``CacheMixin`` and
  pipelines that open a ``cache_context`` around every denoiser call; PixArt has neither, so
  :class:`DiffusersHookPeer` mixes ``CacheMixin`` into the transformer's class for the peer's
  runs (diffusers' own enable/disable code then runs unchanged) and opens the context from a
  forward pre-hook (one context for the batched uncond+cond call: one call per step).
* diffusers' MagCache needs the model's per-step "mag_ratios": :class:`MagCacheCalibration`
  gets them once per pipeline from one generation with ``MagCacheConfig(calibrate=True)``
  (nothing skipped; diffusers prints the ratios at the last step, which is read back) on
  :data:`MAGCACHE_CALIBRATION_PROMPT`, then every MagCache peer runs with them. That run
  goes through the benchmark's own call (``available_peers(..., calibrate=,
  num_inference_steps=)``); without one the MagCache peer is reported as skipped.
* cache-dit's DBCache (``cache_dit.enable_cache`` with ``DBCacheConfig``), plain and with
  its TaylorSeer calibrator (``calibrator_config=TaylorSeerCalibratorConfig``), optional:
  when the package is missing the peers are reported as skipped with the install command.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xfuser.logger import init_logger

logger = init_logger("benchmark.peers")

# MagCache's calibration prompt: a caption in the embedded model's style that is none of the
# benchmark's evaluation prompts (cache_execute.DEFAULT_PROMPTS, HELDOUT_PROMPTS) and none of
# the FastCache calibration prompts; evaluate on prompts that differ from it
MAGCACHE_CALIBRATION_PROMPT = "a black square on a yellow background, top left"
# MagCache's other knobs at diffusers' defaults: at most 3 skipped steps in a row (K), no
# skipping in the first 20% of the steps; its error threshold is the benchmark's peer threshold
MAGCACHE_MAX_SKIP_STEPS = 3
MAGCACHE_RETENTION_RATIO = 0.2
# cache-dit's TaylorSeer calibrator: first order, cache-dit's default and the order that
# needs the fewest computed steps before it can forecast (short schedules)
CACHE_DIT_TAYLORSEER_ORDER = 1
_MAGCACHE_PRINT_MARKER = "[MagCache] Calibration Complete"


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


class MagCacheCalibration:
    """diffusers MagCache's ``mag_ratios`` for one pipeline, from one calibration run.

    ``calibrate(prompt)`` runs one generation of ``prompt`` through the benchmark's own call,
    with ``num_inference_steps`` steps. During it MagCache is enabled with ``calibrate=True``:
    it skips nothing and, at the last step, prints the ratio of each step's residual norm to
    the previous one's (the first is 1.0); that printed list is the result, kept for every
    later :meth:`ratios` call. MagCache counts one transformer call per step (the batched
    uncond+cond call of PixArt), and the ratios must come from the schedule they are used on:
    both are checked.
    """

    def __init__(self, pipe: Any, calibrate: Callable[[str], Any], num_inference_steps: int,
                 prompt: str = MAGCACHE_CALIBRATION_PROMPT) -> None:
        if num_inference_steps < 2:
            raise ValueError("MagCache calibration needs at least 2 inference steps")
        self.pipe = pipe
        self.calibrate = calibrate
        self.num_inference_steps = num_inference_steps
        self.prompt = prompt
        self._ratios: list[float] | None = None

    def ratios(self, pipe: Any) -> list[float]:
        if pipe is not self.pipe:
            raise ValueError("these MagCache peers were calibrated for another pipeline")
        if self._ratios is None:
            self._ratios = self._run(pipe)
            logger.info("MagCache ratios (%d steps, prompt %r): %s", self.num_inference_steps, self.prompt,
                        [round(r, 5) for r in self._ratios])
        return list(self._ratios)

    def _run(self, pipe: Any) -> list[float]:
        from diffusers import MagCacheConfig

        steps = self.num_inference_steps
        hook = DiffusersHookPeer(lambda _: MagCacheConfig(calibrate=True, num_inference_steps=steps))
        calls: list[int] = []
        printed = io.StringIO()
        hook.enable(pipe)
        counter = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
        try:
            hook.reset(pipe)
            with contextlib.redirect_stdout(printed):
                self.calibrate(self.prompt)
        finally:
            counter.remove()
            hook.disable(pipe)
        ratios, rest = _read_magcache_print(printed.getvalue())
        sys.stdout.write(rest)  # anything else the run printed
        if len(calls) != steps:
            raise RuntimeError(f"MagCache calibration: the transformer ran {len(calls)} times in {steps} steps; "
                               "MagCache counts one call per step")
        if ratios is None or len(ratios) != steps:
            raise RuntimeError(f"MagCache calibration printed no {steps}-step ratios: {printed.getvalue()[-500:]!r}")
        return ratios


def _read_magcache_print(text: str) -> tuple[list[float] | None, str]:
    """The ratio list MagCache prints on the line after its marker, and what else was printed."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines[:-1]):
        if _MAGCACHE_PRINT_MARKER in line:
            try:
                ratios = [float(r) for r in ast.literal_eval(lines[i + 1].strip())]
            except (ValueError, SyntaxError, TypeError):
                return None, text
            rest = "".join(lines[:i] + lines[i + 2:])
            return ratios, rest if rest.strip() else ""
    return None, text


def magcache_peers(thresholds: list[float], calibration: MagCacheCalibration) -> list[Peer]:
    """MagCache at each threshold (its accumulated-error bound), with the calibrated ratios."""
    from diffusers import MagCacheConfig

    def make(threshold: float) -> Peer:
        hook = DiffusersHookPeer(
            lambda _, th=threshold: MagCacheConfig(
                threshold=th, max_skip_steps=MAGCACHE_MAX_SKIP_STEPS, retention_ratio=MAGCACHE_RETENTION_RATIO,
                num_inference_steps=calibration.num_inference_steps, mag_ratios=calibration.ratios(calibration.pipe),
            )
        )

        def enable(pipe: Any) -> None:
            calibration.ratios(pipe)  # the calibration run (first peer only), before any hook is on
            hook.enable(pipe)

        return Peer("diffusers-MagCache", threshold, enable, hook.disable, hook.reset)

    return [make(t) for t in thresholds]


def quiet_library_logs(prefix: str) -> None:
    """A peer's INFO chatter (cache-dit logs ~7 lines per enable) at WARNING, so the benchmark's
    own progress stays readable; its warnings and errors still show. Applied to every logger of
    the package, including those it creates lazily on first use (hence called at each enable)."""
    for name in list(logging.root.manager.loggerDict):
        if name == prefix or name.startswith(prefix + "."):
            logging.getLogger(name).setLevel(logging.WARNING)


def cache_dit_available() -> bool:
    return importlib.util.find_spec("cache_dit") is not None


def cache_dit_peers(thresholds: list[float], num_blocks: int) -> list[Peer]:
    """DBCache with Fn=1 compute block in front and Bn=0 behind (F1B0), which suits small
    models: larger Fn/Bn leave nothing to skip on an 8-block transformer; plain (the cached
    residual reused as is) and with cache-dit's TaylorSeer calibrator (the residual forecast
    from the computed steps' by a first-order Taylor expansion)."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "WARNING")  # read when cache-dit is first imported
    import cache_dit

    def make(method: str, threshold: float, calibrator: Callable[[], Any] | None) -> Peer:
        def enable(pipe: Any) -> None:
            quiet_library_logs("cache_dit")
            cache_dit.enable_cache(
                pipe,
                cache_config=cache_dit.DBCacheConfig(
                    Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=2,
                ),
                **({"calibrator_config": calibrator()} if calibrator is not None else {}),
            )

        def disable(pipe: Any) -> None:
            cache_dit.disable_cache(pipe)

        return Peer(method, threshold, enable, disable)

    if num_blocks < 2:
        raise ValueError("DBCache F1B0 needs at least 2 transformer blocks")
    taylorseer = lambda: cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=CACHE_DIT_TAYLORSEER_ORDER)  # noqa: E731
    return [make("cache-dit-DBCache", t, None) for t in thresholds] + \
        [make("cache-dit-DBCache-TaylorSeer", t, taylorseer) for t in thresholds]


def available_peers(
    pipe: Any, thresholds: list[float], calibrate: Callable[[str], Any] | None = None,
    num_inference_steps: int | None = None,
) -> tuple[list[Peer], list[dict[str, str]]]:
    """Peers runnable here, and a {name, reason} entry for each one that is not.

    ``calibrate(prompt)`` runs one uncached generation of ``prompt`` the way the benchmark
    runs its cases, with ``num_inference_steps`` steps; MagCache needs it for its ratios (run
    once, on the first MagCache peer's ``enable``) and is skipped without it."""
    from xfuser.model_executor.cache.adapters import adapter_for

    peers, skipped = [], []
    try:
        peers += diffusers_peers(thresholds, adapter_for(pipe.transformer).block_lists)
    except ImportError as exc:
        skipped.append({"name": "diffusers cache hooks", "reason": f"not available in this diffusers: {exc}"})
    if calibrate is None or num_inference_steps is None:
        skipped.append({"name": "diffusers-MagCache",
                        "reason": "needs a calibration run: available_peers(..., calibrate=, num_inference_steps=)"})
    else:
        try:
            peers += magcache_peers(thresholds, MagCacheCalibration(pipe, calibrate, num_inference_steps))
        except ImportError as exc:
            skipped.append({"name": "diffusers-MagCache", "reason": f"not available in this diffusers: {exc}"})
    if cache_dit_available():
        num_blocks = len(getattr(pipe.transformer, "transformer_blocks", []))
        peers += cache_dit_peers(thresholds, num_blocks)
    else:
        for name in ("cache-dit-DBCache", "cache-dit-DBCache-TaylorSeer"):
            skipped.append({"name": name, "reason": "not installed (pip install cache-dit==1.5.3)"})
    return peers, skipped
