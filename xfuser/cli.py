"""The shared body of every ``examples/<model>_example.py``: parse xFuserArgs, validate,
load the pipeline, enable the cache, generate, save the image and the cache statistics.

Why shared: the examples differ only in the pipeline class and defaults; one body means one
place where validation happens before any model loads and one output naming scheme.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from xfuser.config import ConfigError, EngineConfig, InputConfig, xFuserArgs
from xfuser.logger import init_logger
from xfuser.model_executor.pipelines.call_args import prepare_call_kwargs
from xfuser.model_executor.pipelines.fastcache_pipeline import check_method_supported, xFuserFastCachePipelineWrapper

logger = init_logger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def output_name(model_name: str, engine: EngineConfig) -> str:
    p = engine.parallel_config
    patches = p.num_pipeline_patch or 1
    return (
        f"{model_name}_dp{p.dp_degree}_cfg{p.cfg_degree}_ulysses{p.ulysses_degree}_ring{p.ring_degree}"
        f"_pp{p.pp_degree}_patch{patches}_{engine.cache_config.method}"
    )


def _require_single_process(engine: EngineConfig) -> None:
    p = engine.parallel_config
    if p.world_size > 1 or p.use_parallel_vae:
        raise ConfigError(
            "parallel runners (--data_parallel_degree/--use_cfg_parallel/--ulysses_degree/--ring_degree/"
            "--pipefusion_parallel_degree/--use_parallel_vae) are not available in this build yet; "
            "run with all degrees = 1 on one process"
        )


def load_pipeline(pipeline_cls, engine: EngineConfig):
    dtype = _DTYPES[engine.model_config.dtype]
    pipe = pipeline_cls.from_pretrained(engine.model_config.model, torch_dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=os.environ.get("XFUSER_PROGRESS", "1") == "0")
    return pipe


def generate(pipe, engine: EngineConfig, inputs: InputConfig, extra_call_kwargs: dict[str, Any] | None = None):
    """Run one (cached) generation; returns (output, wrapper, seconds)."""
    wrapper = xFuserFastCachePipelineWrapper(pipe)
    if engine.cache_config.enabled:
        wrapper.enable_cache(config=engine.cache_config)
    kwargs = prepare_call_kwargs(pipe, inputs.height, inputs.width)
    if inputs.guidance_scale is not None:
        kwargs["guidance_scale"] = inputs.guidance_scale
    if inputs.max_sequence_length is not None:
        kwargs["max_sequence_length"] = inputs.max_sequence_length
    if inputs.negative_prompt:
        kwargs["negative_prompt"] = inputs.negative_prompt
    kwargs.update(extra_call_kwargs or {})
    generator = torch.Generator(device="cpu").manual_seed(inputs.seed)
    start = time.perf_counter()
    output = wrapper(
        prompt=inputs.prompt,
        num_inference_steps=inputs.num_inference_steps,
        generator=generator,
        output_type=inputs.output_type,
        **kwargs,
    )
    return output, wrapper, time.perf_counter() - start


def run_example(pipeline_cls, model_name: str, argv: list[str] | None = None, description: str | None = None) -> dict[str, Any]:
    parser = xFuserArgs.add_cli_args(argparse.ArgumentParser(description=description))
    parser.add_argument("--output_dir", "--output-dir", default="results", help="where images and stats go (default: results)")
    ns = parser.parse_args(argv)
    args = xFuserArgs.from_cli_args(ns)
    engine, inputs = args.create_config()  # validates everything before any model loads
    _require_single_process(engine)
    pipe = load_pipeline(pipeline_cls, engine)
    if engine.cache_config.enabled:
        check_method_supported(pipe.transformer, engine.cache_config)
    output, wrapper, seconds = generate(pipe, engine, inputs)
    out_dir = Path(ns.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = output_name(model_name, engine)
    report: dict[str, Any] = {"latency_s": seconds, "model": engine.model_config.model}
    if inputs.output_type == "pil":
        for i, image in enumerate(output.images):
            path = out_dir / (f"{name}.png" if len(output.images) == 1 else f"{name}_{i}.png")
            image.save(path)
            report.setdefault("images", []).append(str(path))
    stats = wrapper.get_cache_statistics()
    if stats:
        report["cache"] = {k: stats[k] for k in ("method", "hit_ratio", "compute_fraction", "flops_skipped_fraction")}
        (out_dir / f"{name}_stats.json").write_text(json.dumps(stats, indent=2))
        report["stats_file"] = str(out_dir / f"{name}_stats.json")
    if torch.cuda.is_available():
        report["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    logger.info("%s: %.2fs %s", name, seconds, json.dumps({k: v for k, v in report.items() if k != "model"}))
    return report
