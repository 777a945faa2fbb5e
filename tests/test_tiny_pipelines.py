"""Every tiny pipeline builds offline, runs 2 steps deterministically, and survives
save_pretrained -> from_pretrained (generic and specific class) with identical output."""
from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline

from xfuser.testing.tiny_pipelines import TINY_MODEL_TYPES, build_tiny_pipeline, tiny_call_kwargs


def _run(pipe, model_type):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**tiny_call_kwargs(model_type))
    return out.images if hasattr(out, "images") else out.frames


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_builds_runs_and_round_trips(model_type, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = build_tiny_pipeline(model_type)
    first = _run(pipe, model_type)
    assert torch.isfinite(first).all()
    assert torch.equal(first, _run(pipe, model_type)), "same seed must give the same output"
    pipe.save_pretrained(tmp_path)
    generic = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(generic) is type(pipe)
    assert torch.equal(_run(generic, model_type), first)
    specific = type(pipe).from_pretrained(tmp_path)
    assert torch.equal(_run(specific, model_type), first)


def test_unknown_type_is_rejected():
    with pytest.raises(ValueError, match="unknown tiny model type"):
        build_tiny_pipeline("sd15")
