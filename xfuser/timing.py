"""Wall-clock timing that is right on every device.

Accelerators run kernels asynchronously: a clock read right after a call measures how long it
took to *queue* the work, so an uncached baseline and a cached run would be timed with
different amounts of work still in flight. :func:`timed` waits for the device before both
clock reads (a no-op on CPU); every benchmark and ``xDiTParallel.latency_s`` time through it.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device | str | None) -> None:
    """Wait until every kernel queued on ``device`` has finished (nothing to wait for on CPU)."""
    if device is None:
        return
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        current = accelerator.current_accelerator()
        if current is not None and current.type == device.type:
            accelerator.synchronize(device)
            return
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, torch.mps, ...
    if backend is None or not hasattr(backend, "synchronize"):
        raise RuntimeError(f"cannot synchronize device {device}: torch.{device.type}.synchronize does not exist")
    if device.type == "mps":
        backend.synchronize()
    else:
        backend.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str | None) -> tuple[T, float]:
    """(fn(), seconds) with the device drained before the start and before the end reading."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """min and median of repeated timings (the caller leaves its warm-up runs out)."""
    if not seconds:
        raise ValueError("no timings to summarize")
    return {"min_s": min(seconds), "median_s": statistics.median(seconds), "runs": float(len(seconds))}


def model_device(pipe: Any) -> torch.device | None:
    """The device a pipeline's transformer runs on (what a timing must wait for)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return getattr(pipe, "device", None)
    try:
        return next(p.device for p in transformer.parameters() if p.device.type != "meta")
    except StopIteration:
        return None
