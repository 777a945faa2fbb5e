"""``--use_torch_compile``: regional compilation of the blocks equals eager, under every cache
method, in one process and under USP / CFG parallel; a second generation does not recompile,
and the single-process path has no graph break."""
from __future__ import annotations

import pytest
import torch

from xfuser.testing.multiprocess import run_on_ranks

from test_parallel_equivalence import METHODS as _EQUIVALENCE_METHODS  # noqa: E402 - one table of tiny-model thresholds

METHODS = {k: _EQUIVALENCE_METHODS[k] for k in ("None", "Fb", "Tea", "Fast")}
STEPS = 5
MODEL = "pixart-sigma"


def _generate(world: int, parallel: dict, compile_: bool, methods: dict) -> dict:
    """Latents and decision logs per method, with one runner reconfigured method by method."""
    from xfuser import xFuserArgs
    from xfuser.parallel import xDiTParallel
    from xfuser.testing.tiny_pipelines import build_tiny_pipeline, tiny_call_kwargs

    pipe = build_tiny_pipeline(MODEL)
    pipe.set_progress_bar_config(disable=True)
    extra = tiny_call_kwargs(MODEL)
    runner, results = None, {}
    for name, method in methods.items():
        engine, inputs = xFuserArgs(
            model="tiny", prompt=[extra["prompt"]], num_inference_steps=STEPS, seed=3, output_type="latent",
            height=extra["height"], width=extra["width"], guidance_scale=extra["guidance_scale"],
            max_sequence_length=extra["max_sequence_length"], use_torch_compile=compile_, **parallel, **method,
        ).create_config(world_size=world)
        if runner is None:
            runner = xDiTParallel(pipe, engine, inputs)
        else:
            runner.inputs = inputs
            runner.enable_cache(engine.cache_config)
        out = runner(use_resolution_binning=False, clean_caption=False)
        results[name] = {"latents": out.images.clone(), "log": runner.manager.decision_log(),
                         "hit_ratio": runner.get_cache_statistics()["hit_ratio"]}
    return results


def _compiled_twice_worker(rank: int, world: int, parallel: dict) -> dict:
    """Compiled results, then every method again with recompilation made an error."""
    from torch._dynamo.utils import counters

    counters.clear()
    first = _generate(world, parallel, True, METHODS)
    breaks = sum(counters["graph_break"].values())
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _generate(world, parallel, True, METHODS)
    return {"first": first, "again": again, "graph_breaks": breaks}


def _assert_close(actual: dict, expected: dict, rtol: float = 1e-4) -> None:
    for name in METHODS:
        a, e = actual[name]["latents"], expected[name]["latents"]
        rel = ((a - e).norm() / e.norm()).item()
        assert rel <= rtol, f"{name}: compiled differs from eager by {rel:.2e} (relative L2)"
        assert actual[name]["log"] == expected[name]["log"], f"{name}: compiled run took other cache decisions"


@pytest.fixture(scope="module")
def eager() -> dict:
    return _generate(1, {}, False, METHODS)


def test_compiled_equals_eager_and_does_not_recompile(eager):
    compiled = _compiled_twice_worker(0, 1, {})
    _assert_close(compiled["first"], eager)
    _assert_close(compiled["again"], eager)
    assert compiled["graph_breaks"] == 0, "a block had a graph break in one process"
    for name in METHODS:  # the cache actually skipped work while compiled (decisions outside the graph)
        if name != "None":
            assert compiled["first"][name]["hit_ratio"] > 0, name


@pytest.mark.parametrize("parallel", [dict(ulysses_degree=2), dict(use_cfg_parallel=True)], ids=["ulysses2", "cfg2"])
def test_compiled_parallel_equals_eager_single_process(eager, parallel):
    outs = run_on_ranks(_compiled_twice_worker, 2, parallel, timeout_s=420)
    for out in outs.results:
        _assert_close(out["first"], eager)
        _assert_close(out["again"], eager)


def test_compile_blocks_is_idempotent_and_wraps_the_real_block():
    from xfuser.model_executor.cache.manager import CacheManager, CachedBlock
    from xfuser.config import CacheConfig
    from xfuser.model_executor.compile import compile_blocks, is_compiled
    from xfuser.testing.tiny_pipelines import build_tiny_pipeline

    transformer = build_tiny_pipeline(MODEL).transformer
    manager = CacheManager(transformer, CacheConfig(method="Fb")).install()
    assert not is_compiled(transformer)
    n = compile_blocks(transformer)
    assert n == len(transformer.transformer_blocks) and is_compiled(transformer)
    for wrapper in transformer.transformer_blocks:
        assert isinstance(wrapper, CachedBlock)  # the decision wrapper stays eager
        assert getattr(wrapper, "_compiled_call_impl", None) is None
    assert compile_blocks(transformer) == n
    manager.uninstall()
    assert is_compiled(transformer)  # the model's own blocks keep their compiled forward

