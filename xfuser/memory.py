"""Peak memory of one generation, on every device.

On an accelerator the allocator keeps a resettable high-water mark
(``torch.cuda.max_memory_allocated``). On CPU the closest honest figure is the process's
peak resident set: Linux resets it when ``5`` is written to ``/proc/self/clear_refs`` and
reports it as ``VmHWM`` in ``/proc/self/status``. Elsewhere the process-lifetime peak
(``ru_maxrss``) is all there is, and :func:`peak_memory` says so in its ``kind``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass(frozen=True)
class PeakMemory:
    """``bytes``: the peak; ``kind``: what was measured (``allocated`` on an accelerator,
    ``rss`` on CPU since the last reset, ``rss_lifetime`` where the peak cannot be reset)."""

    bytes: int
    kind: str

    def as_dict(self) -> dict[str, object]:
        return {"bytes": self.bytes, "gib": self.bytes / 2**30, "kind": self.kind}


def _accelerator(device: torch.device | str | None):
    if device is None:
        return None
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return None
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "max_memory_allocated"):
        return None
    return backend


def _rss_resettable() -> bool:
    return sys.platform.startswith("linux") and os.access(_CLEAR_REFS, os.W_OK)


def reset_peak_memory(device: torch.device | str | None) -> None:
    """Start a new high-water mark on ``device`` (and on the host for CPU)."""
    backend = _accelerator(device)
    if backend is not None:
        backend.reset_peak_memory_stats(torch.device(device))
        return
    if _rss_resettable():
        try:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError:
            pass


def _vm_hwm() -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(device: torch.device | str | None) -> PeakMemory:
    """The high-water mark since :func:`reset_peak_memory` (see the module docstring)."""
    backend = _accelerator(device)
    if backend is not None:
        return PeakMemory(int(backend.max_memory_allocated(torch.device(device))), "allocated")
    hwm = _vm_hwm()
    if hwm is not None:
        return PeakMemory(hwm, "rss" if _rss_resettable() else "rss_lifetime")
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return PeakMemory(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "rss_lifetime")
