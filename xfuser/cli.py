"""The shared body of every ``examples/<model>_example.py``: parse xFuserArgs, validate,
load the pipeline, enable the cache, generate, save the image and the cache statistics.

Why shared: the examples differ only in the pipeline class and defaults; one body means one
place where validation happens before any model loads and one output naming scheme.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


from xfuser.config import EngineConfig, xFuserArgs
from xfuser.logger import init_logger

logger = init_logger(__name__)

def output_name(model_name: str, engine: EngineConfig) -> str:
    p = engine.parallel_config
    patches = p.num_pipeline_patch or 1
    return (
        f"{model_name}_dp{p.dp_degree}_cfg{p.cfg_degree}_ulysses{p.ulysses_degree}_ring{p.ring_degree}"
        f"_pp{p.pp_degree}_patch{patches}_{engine.cache_config.method}"
    )


def load_pipeline(pipeline_cls, engine: EngineConfig):
    dtype = engine.model_config.torch_dtype
    pipe = pipeline_cls.from_pretrained(engine.model_config.model, dtype=dtype)  # xDiTParallel places it
    pipe.set_progress_bar_config(disable=os.environ.get("XFUSER_PROGRESS", "1") == "0")
    return pipe


def run_example(
    pipeline_cls,
    model_name: str,
    argv: list[str] | None = None,
    description: str | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    call_inputs: Callable[[argparse.Namespace, Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Parse, validate, load, run under ``xDiTParallel`` (one process or torchrun), save.

    ``add_args`` adds model-specific flags; ``call_inputs(ns, pipe)`` turns them into extra
    pipeline call arguments (e.g. ConsisID's face embeddings), prepared before the run."""
    from xfuser.core.distributed import destroy_distributed_environment, get_world_group
    from xfuser.parallel import xDiTParallel

    parser = xFuserArgs.add_cli_args(argparse.ArgumentParser(description=description))
    parser.add_argument("--output_dir", "--output-dir", default="results", help="where images and stats go (default: results)")
    if add_args is not None:
        add_args(parser)
    ns = parser.parse_args(argv)
    engine, inputs = xFuserArgs.from_cli_args(ns).create_config()  # validates before any model loads
    pipe = load_pipeline(pipeline_cls, engine)
    try:
        runner = xDiTParallel(pipe, engine, inputs)
        runner(**(call_inputs(ns, pipe) if call_inputs is not None else {}))
        out_dir = Path(ns.output_dir)
        name = output_name(model_name, engine)
        report: dict[str, Any] = {"latency_s": runner.latency_s, "model": engine.model_config.model}
        report["images"] = runner.save(out_dir, name)
        if runner.is_output_rank and engine.cache_config.enabled:
            stats = runner.get_cache_statistics()
            report["cache"] = {k: stats[k] for k in ("method", "hit_ratio", "compute_fraction", "flops_skipped_fraction")}
            stats_path = out_dir / f"{name}_stats.json"
            stats_path.write_text(json.dumps(stats, indent=2))
            report["stats_file"] = str(stats_path)
        if runner.peak_memory is not None:  # the generation's high-water mark on this rank's device
            report["peak_memory"] = runner.peak_memory.as_dict()
        if get_world_group().is_last_rank:
            logger.info("%s: latency %.2fs %s", name, runner.latency_s, json.dumps({k: v for k, v in report.items() if k not in ("model", "latency_s")}))
        return report
    finally:
        destroy_distributed_environment()
