"""FastCache's learned forecast: what a skipped block returns, fitted offline by least squares.

When block l is skipped at step t, its last computed step is b = t − g (g = the gap, 1..G) and,
if it was computed before that, a = b − h. From what is cached the forecast is

    R̂_t = α ⊙ R_b + β ⊙ (g/h)·(R_b − R_a) + γ ⊙ (H_t − H_b),      Ŷ_t = H_t + R̂_t

(R = block output − block input, H = block input). α, β, γ are per block, per step t, per gap
g, per "trend available" flag, and per channel group (one per channel when the table stays
small, else one per attention head: a D² map per block and step would cost 9.4 M values per
block for FLUX). Reuse is α = 1, β = γ = 0; first-order extrapolation is α = β = 1; γ is the
diagonal part of the seed's H_out = W·H_in + b. A file holds the features it was fitted with
(``meta["features"]``; the default, chosen by measurement, is α everywhere and β for gaps ≤ 2:
docs/methods/fastcache.md §3.0).
The coefficients come from ``python -m
xfuser.model_executor.cache.calibrate --method Fast`` (forecast_fit.py), which also stores per
(l, t, g, flag) the forecast's relative output error E = ‖R̂ − R‖/‖Y‖ and the block's typical
input change δ_cal = ‖H_t − H_b‖/‖H_b‖ on the calibration prompts: FastCache's χ² test then
asks whether the predictor's expected error at this input change, E·δ/δ_cal, is within τ.

The file (safetensors) sits next to the model as ``fastcache.safetensors``; its header says
which transformer class, block count, stream widths and step count it was fitted for, and a
file that does not match is refused with the command that makes a new one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xfuser.config.config import ConfigError

FORMAT = "xfuser-fastcache-forecast"
VERSION = 1
FILENAME = "fastcache.safetensors"
FEATURES = ("residual", "trend", "input_change")
CALIBRATE_HINT = "python -m xfuser.model_executor.cache.calibrate --model MODEL_DIR --method Fast --out MODEL_DIR/fastcache.safetensors"


class ForecastError(ConfigError):
    """A calibration file that cannot be used for this model or run (says how to make one)."""


@dataclass
class LearnedForecast:
    """Coefficients ``coef[k]`` of stream k: (blocks, steps, max_gap, 2, len(meta["features"]), groups);
    ``error`` and ``delta``: (blocks, steps, max_gap, 2) and (blocks, steps, max_gap) float64
    tables (inf where nothing was fitted: the block then always computes)."""

    coef: list[torch.Tensor]
    error: torch.Tensor
    delta: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # decisions are host-side arithmetic: plain nested lists avoid a tensor index per block
        self._error = self.error.tolist()
        self._delta = self.delta.tolist()
        self.features = tuple(self.meta.get("features", FEATURES))
        self._slot = {name: i for i, name in enumerate(self.features)}
        self._expanded: dict[tuple, list[torch.Tensor | None]] = {}

    # ------------------------------------------------------------------ shape
    @property
    def num_blocks(self) -> int:
        return int(self.error.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.error.shape[1])

    @property
    def max_gap(self) -> int:
        return int(self.error.shape[2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.coef, self.error, self.delta))

    # ------------------------------------------------------------------ use
    def expected_error(self, block: int, step: int, gap: int, trend: bool) -> tuple[float, float]:
        """(E, δ_cal) of the forecast for this block, step and gap (inf, 1 when not fitted)."""
        if not (0 <= step < self.num_steps and 1 <= gap <= self.max_gap):
            return math.inf, 1.0
        return self._error[block][step][gap - 1][int(trend)], self._delta[block][step][gap - 1]

    def _coefficients(self, block: int, step: int, gap: int, stream: int, trend: bool, like: torch.Tensor) -> list[torch.Tensor | None]:
        """Per-channel (α, β, γ) on ``like``'s device and dtype, None for a feature not fitted;
        expanded once per (block, step, gap, …) and kept: a skip costs only the arithmetic."""
        key = (block, step, gap, stream, trend, like.device, like.dtype)
        found = self._expanded.get(key)
        if found is None:
            c = self.coef[stream][block, step, gap - 1, int(trend)]
            c = c.repeat_interleave(like.shape[-1] // c.shape[-1], dim=-1).to(device=like.device, dtype=like.dtype)
            found = [c[self._slot[name]] if name in self._slot else None for name in FEATURES]
            self._expanded[key] = found
        return found

    def predict(
        self, block: int, step: int, gap: int, stream: int, x_now: torch.Tensor, x_ref: torch.Tensor,
        r_ref: torch.Tensor, trend: torch.Tensor | None,
    ) -> torch.Tensor:
        """Ŷ_t of stream ``stream``; ``trend`` = (g/h)(R_b − R_a) or None (no earlier compute)."""
        alpha, beta, gamma = self._coefficients(block, step, gap, stream, trend is not None, x_now)
        out = torch.addcmul(x_now, alpha, r_ref)
        if beta is not None and trend is not None:
            out = out.addcmul_(beta, trend)
        if gamma is not None:
            out = out.addcmul_(gamma, x_now - x_ref)
        return out

    @property
    def needs_trend(self) -> bool:
        return "trend" in self._slot

    def uses_trend(self, gap: int) -> bool:
        """Whether the forecast at this gap has a trend term (files limit it to short gaps)."""
        limit = self.meta.get("trend_max_gap")
        return self.needs_trend and (limit is None or gap <= limit)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {f"coef.{k}": c.contiguous() for k, c in enumerate(self.coef)}
        tensors["error"] = self.error.contiguous()
        tensors["delta"] = self.delta.contiguous()
        # one metadata entry: safetensors keeps a map, whose order would make equal fits differ in bytes
        meta = {"xfuser": json.dumps({"format": FORMAT, "version": VERSION, "meta": self.meta}, sort_keys=True)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LearnedForecast":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("xfuser", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ForecastError(f"{path}: not a readable FastCache calibration file ({exc}); make one with `{CALIBRATE_HINT}`") from exc
        if header.get("format") != FORMAT:
            raise ForecastError(f"{path}: not a FastCache calibration file (format {header.get('format')!r}); make one with `{CALIBRATE_HINT}`")
        if header.get("version") != VERSION:
            raise ForecastError(f"{path}: calibration format version {header.get('version')} (this xfuser reads {VERSION}); re-run `{CALIBRATE_HINT}`")
        try:
            meta = header.get("meta", {})
            coef = [tensors[f"coef.{k}"] for k in range(len(meta["stream_widths"]))]
            forecast = cls(coef, tensors["error"], tensors["delta"], meta)
        except (KeyError, ValueError, TypeError) as exc:
            raise ForecastError(f"{path}: incomplete FastCache calibration file ({exc!r}); re-run `{CALIBRATE_HINT}`") from exc
        forecast._check_consistent(path)
        return forecast

    def _check_consistent(self, path: Path) -> None:
        shape = tuple(self.error.shape)
        if len(shape) != 4 or shape[3] != 2 or tuple(self.delta.shape) != shape[:3]:
            raise ForecastError(f"{path}: error/delta tables have shapes {shape}/{tuple(self.delta.shape)}; re-run `{CALIBRATE_HINT}`")
        for k, (c, width) in enumerate(zip(self.coef, self.meta["stream_widths"])):
            if c.ndim != 6 or tuple(c.shape[:4]) != shape or c.shape[4] != len(self.features) or width % c.shape[5]:
                raise ForecastError(f"{path}: coefficients of stream {k} have shape {tuple(c.shape)}, expected {shape + (len(self.features), 'groups dividing ' + str(width))}; re-run `{CALIBRATE_HINT}`")
        if not self.features or self.features[0] != "residual" or any(f not in FEATURES for f in self.features):
            raise ForecastError(f"{path}: unknown features {list(self.features)}; re-run `{CALIBRATE_HINT}`")

    def check_matches(self, transformer, num_blocks: int, stream_widths: list[int], source: str) -> None:
        """Raise :class:`ForecastError` unless this file was fitted for this model."""
        want = self.meta.get("transformer")
        if want != type(transformer).__name__:
            raise ForecastError(f"{source} was calibrated for {want}, not {type(transformer).__name__}; make one for this model with `{CALIBRATE_HINT}`")
        if num_blocks != self.num_blocks:
            raise ForecastError(f"{source} was calibrated for {self.num_blocks} blocks, this transformer has {num_blocks}; re-run `{CALIBRATE_HINT}`")
        if list(stream_widths) != list(self.meta["stream_widths"]):
            raise ForecastError(f"{source} was calibrated for stream widths {self.meta['stream_widths']}, this transformer has {list(stream_widths)}; re-run `{CALIBRATE_HINT}`")

    def check_steps(self, num_steps: int, source: str) -> None:
        """Raise :class:`ForecastError` unless this file was fitted for ``num_steps`` steps."""
        if num_steps != self.num_steps:
            raise ForecastError(
                f"{source} was calibrated for --num_inference_steps {self.num_steps}, this run has {num_steps}; "
                f"run with {self.num_steps} steps or re-run `{CALIBRATE_HINT} --num_inference_steps {num_steps}`"
            )


_LOADED: dict[tuple[str, int], LearnedForecast] = {}


def load_forecast(path: str | Path) -> LearnedForecast:
    """:meth:`LearnedForecast.load`, read once per file version (PipeFusion builds one FastCache
    per patch, and every call of a wrapper resets them)."""
    path = Path(path)
    try:
        key = (str(path.resolve()), path.stat().st_mtime_ns)
    except OSError as exc:
        raise ForecastError(f"FastCache calibration {path} cannot be read ({exc}); make one with `{CALIBRATE_HINT}`") from exc
    if key not in _LOADED:
        _LOADED[key] = LearnedForecast.load(path)
    return _LOADED[key]


def stream_widths(transformer, adapter) -> list[int]:
    """Channel width of each stream a block updates (checked against a calibration file)."""
    inner = getattr(transformer.config, "num_attention_heads", 0) * getattr(transformer.config, "attention_head_dim", 0)
    return [int(inner)] * len(adapter.streams)


def find_forecast(transformer) -> Path | None:
    """``fastcache.safetensors`` beside the model (the directory ``from_pretrained`` read)."""
    name = getattr(getattr(transformer, "config", None), "_name_or_path", None) or ""
    if not name:
        return None
    here = Path(str(name))
    for folder in (here, here.parent):
        if (folder / FILENAME).is_file():
            return folder / FILENAME
    return None
