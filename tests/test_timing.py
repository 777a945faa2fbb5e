"""The timing helper waits for the device before both clock reads (no GPU needed to prove it)."""
from __future__ import annotations

import pytest
import torch

from xfuser import timing


def test_timed_synchronizes_before_each_clock_read(monkeypatch):
    events = []
    monkeypatch.setattr(timing, "synchronize", lambda device: events.append(("sync", str(device))))
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append(("clock",)) or next(clock))
    result, seconds = timing.timed(lambda: events.append(("work",)) or "out", "cuda:1")
    assert result == "out" and seconds == 2.5
    assert events == [("sync", "cuda:1"), ("clock",), ("work",), ("sync", "cuda:1"), ("clock",)]


def test_synchronize_waits_on_the_accelerator_and_not_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: calls.append(("accelerator", str(device))))
    timing.synchronize("cuda:0")
    timing.synchronize("cpu")
    timing.synchronize(None)
    assert calls == [("accelerator", "cuda:0")]
    # a device type that is not the current accelerator goes through its own torch backend
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", str(device))))
    timing.synchronize(torch.device("cuda", 1))
    assert calls[-1] == ("cuda", "cuda:1")


def test_summary_and_model_device():
    assert timing.summarize([0.3, 0.1, 0.2]) == {"min_s": 0.1, "median_s": 0.2, "runs": 3.0}
    with pytest.raises(ValueError):
        timing.summarize([])

    class Pipe:
        transformer = torch.nn.Linear(2, 2)

    assert timing.model_device(Pipe()) == torch.device("cpu")
