"""The Python API as FastCache-xDiT's README shows it, on the embedded model: the wrapper called
with nothing but a prompt and a step count, and ``xDiTParallel`` handed the wrapper itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xfuser import xDiTParallel, xFuserFastCachePipelineWrapper
from xfuser.config import xFuserArgs
from xfuser.config.defaults import EMBEDDED_MODEL_DIR
from xfuser.seeding import sample_generators

PROMPT = "a blue square on a yellow background, bottom right"
STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(EMBEDDED_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(output) -> np.ndarray:
    return np.asarray(output.images)


def test_wrapper_runs_with_only_a_prompt_and_steps(pipe):
    """PixArt's resolution binning rejects the embedded model's 64 px; the wrapper prepares the
    call as the CLI does (before: diffusers' "Invalid sample size"), identically every call."""
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_fastcache()
        first = wrapper(prompt=PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                        output_type="np")
        stats = wrapper.get_cache_statistics()
        again = wrapper(PROMPT, "", STEPS, generator=torch.Generator().manual_seed(3), output_type="np")
    assert _images(first).shape == (1, 64, 64, 3)
    assert stats["num_steps"] == STEPS
    np.testing.assert_array_equal(_images(first), _images(again))  # positional = keyword, state reset


def test_xdit_parallel_takes_the_wrappers_cache_over(pipe):
    """``xDiTParallel(wrapper, ...)``: the wrapper's method and knobs win over the engine's, the
    runner's image equals the wrapper's with the same seed, and the pipe is free again after."""
    seed = 11
    with xFuserFastCachePipelineWrapper(pipe) as wrapper:
        wrapper.enable_cache("Fb", cache_ratio_threshold=0.2)
        expected = wrapper(prompt=[PROMPT], num_inference_steps=STEPS, output_type="np",
                           generator=sample_generators(seed, 1))
        expected_stats = wrapper.get_cache_statistics()
    wrapper = xFuserFastCachePipelineWrapper(pipe).enable_cache("Fb", cache_ratio_threshold=0.2)
    engine, inputs = xFuserArgs(prompt=[PROMPT], num_inference_steps=STEPS, seed=seed, output_type="np",
                                cache_method="Fast").create_config(world_size=1)
    with xDiTParallel(wrapper, engine, inputs) as runner:
        got = runner()
        stats = runner.get_cache_statistics()
    assert runner.pipe is pipe
    assert stats["method"] == "Fb" and stats["hit_ratio"] == expected_stats["hit_ratio"] > 0
    np.testing.assert_array_equal(_images(got), _images(expected))
    with xFuserFastCachePipelineWrapper(pipe) as again:  # closed runner: the pipe can be wrapped again
        again.enable_fastcache()


def test_readme_python_snippet_runs_as_written(monkeypatch, capsys):
    """The README's one-process Python snippet, executed verbatim from the repository root."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), flags=re.S)
    snippet = next(b for b in blocks if "xFuserFastCachePipelineWrapper(pipe)" in b)
    monkeypatch.chdir(root)
    monkeypatch.setenv("XFUSER_PROGRESS", "0")
    exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - the documented code is the test
    printed = capsys.readouterr().out.strip().splitlines()
    assert 0 < float(printed[-1]) <= 1  # the hit ratio it prints


def test_a_hub_id_that_cannot_be_fetched_ends_in_one_line(monkeypatch, capsys):
    """Offline, an uncached hub id names the model, why, and the three things to pass instead,
    in the benchmarks' loader and in the examples' entry point (one ``error:`` line, exit 2)."""
    from diffusers import PixArtSigmaPipeline

    import xfuser.testing.tiny_pipelines  # noqa: F401 - registers tiny-* as the benchmark scripts do
    from xfuser.cli import run_example
    from xfuser.config.config import ConfigError
    from xfuser.model_executor.pipelines.model_types import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError) as info:
        load_pipeline("pixart-sigma", "nobody/not-a-model")
    message = str(info.value)
    assert "\n" not in message and "--model nobody/not-a-model" in message and "not in the local Hugging Face cache" in message
    assert str(EMBEDDED_MODEL_DIR) in message and "--model_type tiny-pixart-sigma (random weights" in message
    with pytest.raises(SystemExit) as exit_info:
        run_example(PixArtSigmaPipeline, "hub", argv=["--model", "nobody/not-a-model", "--cache_method", "None"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--model nobody/not-a-model: not in the local Hugging Face cache" in errors[0]


def test_upstream_combining_with_parallel_methods_as_written(pipe):
    """Upstream's "combining with parallel methods": the runner made from the wrapper and called
    with its own prompt and step count; the image is the wrapper's for that prompt and seed."""
    engine, inputs = xFuserArgs(num_inference_steps=20, output_type="np").create_config(world_size=1)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    wrapper.enable_fastcache()
    with xDiTParallel(wrapper, engine, inputs) as paralleler:
        result = paralleler(prompt=[PROMPT, "a red circle on a white background, top left"], num_inference_steps=STEPS)
        stats = paralleler.get_cache_statistics()
    assert _images(result).shape == (2, 64, 64, 3) and stats["num_steps"] == STEPS
    with xFuserFastCachePipelineWrapper(pipe) as alone:
        alone.enable_fastcache()
        second = alone(prompt=["a red circle on a white background, top left"], num_inference_steps=STEPS,
                       output_type="np", generator=sample_generators(inputs.seed, 1, first_prompt=1))
    np.testing.assert_allclose(_images(result)[1:], _images(second), rtol=0, atol=1e-5)  # same seed, same image


def _combined_on_ranks(rank: int, world: int) -> dict:
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(EMBEDDED_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    wrapper.enable_fastcache()
    degree = {"ulysses_degree": world} if world > 1 else {}
    engine, inputs = xFuserArgs(output_type="np", **degree).create_config(world_size=world)
    with xDiTParallel(wrapper, engine, inputs) as paralleler:
        result = paralleler(prompt=PROMPT, num_inference_steps=STEPS)
        return {"images": _images(result), "log": paralleler.manager.decision_log()}


def test_upstream_combination_under_two_ranks_equals_one_process():
    """The same upstream code on 2 gloo ranks (Ulysses 2): identical decisions on both ranks and
    the single-process image (Ulysses attention is exact)."""
    from xfuser.core.distributed import destroy_distributed_environment
    from xfuser.testing.multiprocess import run_on_ranks

    run = run_on_ranks(_combined_on_ranks, 2, timeout_s=240)
    destroy_distributed_environment()
    single = _combined_on_ranks(0, 1)
    destroy_distributed_environment()
    assert run.results[0]["log"] == run.results[1]["log"] == single["log"]
    np.testing.assert_allclose(run.results[0]["images"], single["images"], rtol=0, atol=1e-5)
