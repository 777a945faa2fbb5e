"""The shared body of every ``examples/<model>_example.py``: parse xFuserArgs, validate,
load the pipeline, enable the cache, generate, save the image and the cache statistics.

Bad input (any :class:`ConfigError`, raised before the model loads where the configuration
alone shows it) ends the run with ONE line ``error: <message>`` on stderr, printed by rank 0
only (``RANK``, else 0), and exit status 2 on every rank, without a traceback.

What is saved (``--output_dir``, checked writable before the model loads): ``--output_type
pil`` (the default) as PNG (images) or GIF (videos); ``np`` as one ``.npy`` array and ``pt`` /
``latent`` as one ``.pt`` tensor per replica, each named like the PNG would be.

Why shared: the examples differ only in the pipeline class and defaults; one body means one
place where validation happens before any model loads and one output naming scheme.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from xfuser import strict_json
from xfuser.config import EngineConfig, xFuserArgs
from xfuser.config.config import ConfigError
from xfuser.logger import init_logger, launch_rank

logger = init_logger(__name__)

def output_name(model_name: str, engine: EngineConfig) -> str:
    p = engine.parallel_config
    patches = p.num_pipeline_patch or 1
    return (
        f"{model_name}_dp{p.dp_degree}_cfg{p.cfg_degree}_ulysses{p.ulysses_degree}_ring{p.ring_degree}"
        f"_pp{p.pp_degree}_patch{patches}_{engine.cache_config.method}"
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def describe_model_dir(model: str | os.PathLike) -> tuple[str, list[str]] | None:
    """(what a local model directory holds, one component folder at a time; the model folders
    that have a config.json but no weights file), or None when ``model`` is no directory."""
    root = Path(model)
    if not root.is_dir():
        return None
    parts, missing = [], []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            files = sorted(f.name for f in entry.iterdir() if f.is_file())
            weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES) or f.endswith(".index.json")]
            if "config.json" in files and not weights and not entry.name.startswith(("scheduler", "tokenizer")):
                missing.append(f"{entry.name}/")
            parts.append(f"{entry.name}/ [{', '.join(files) or 'empty'}]")
        else:
            parts.append(entry.name)
    return "; ".join(parts) or "nothing", missing


def load_pipeline(pipeline_cls, engine: EngineConfig):
    """``from_pretrained`` the model; a local directory it cannot load from (a missing or
    misnamed weights file, a missing component folder) is reported with what the directory
    actually holds, since diffusers' own message may name a fallback file instead."""
    dtype = engine.model_config.torch_dtype
    model = engine.model_config.model
    try:
        pipe = pipeline_cls.from_pretrained(model, dtype=dtype)  # xDiTParallel places it
    except (OSError, ValueError) as exc:
        described = describe_model_dir(model)
        if described is None:
            from xfuser.model_executor.pipelines.model_types import unreachable_model_error

            raise unreachable_model_error(str(model), exc) from exc
        listing, missing = described
        reason = " ".join(str(exc).split())
        found = f"{', '.join(missing)} has a config.json but no weights file; " if missing else ""
        raise ConfigError(
            f"--model {model}: {pipeline_cls.__name__}.from_pretrained failed: {found}the directory holds {listing} "
            f"(diffusers said: {reason}); put each component's weights (e.g. diffusion_pytorch_model.safetensors) "
            "in its folder or point --model at a complete checkpoint"
        ) from exc
    pipe.set_progress_bar_config(disable=os.environ.get("XFUSER_PROGRESS", "1") == "0")
    return pipe


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``--output_dir`` and prove it writable, before anything loads."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".xfuser-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"--output_dir {path}: cannot write there ({exc.strerror or exc}); give a writable directory"
        ) from exc
    return directory


def exit_with_error(exc: BaseException) -> NoReturn:
    """One ``error:`` line on rank 0's stderr, exit status 2 on every rank, no traceback."""
    if launch_rank() == 0:
        message = " ".join(str(exc).split())
        # printed, not logged: argparse's own form for a usage error (no level, time or logger
        # name to read past), so a bad flag and a bad value look alike to the user
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """``sys.exit(main())`` for the benchmark and example scripts, with a :class:`ConfigError`
    ending the run as one ``error:`` line (see :func:`exit_with_error`) instead of a traceback."""
    try:
        code = main()
    except ConfigError as exc:
        exit_with_error(exc)
    raise SystemExit(code if isinstance(code, int) else 0)


def save_arrays(output, directory: Path, name: str, output_type: str, dp_rank: int, dp_world: int) -> list[str]:
    """``np`` output as ``<name>.npy``, ``pt`` / ``latent`` as ``<name>.pt`` (the whole batch of
    this replica in one file; ``_dp<r>`` added under data parallel)."""
    items = getattr(output, "images", None)
    if items is None:
        items = getattr(output, "frames", None)
    if items is None:
        return []
    suffix = f"_dp{dp_rank}" if dp_world > 1 else ""
    if output_type == "np":
        import numpy as np

        path = directory / f"{name}{suffix}.npy"
        np.save(path, np.asarray(items))
    else:
        import torch

        path = directory / f"{name}{suffix}.pt"
        torch.save(items, path)
    return [str(path)]


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
    pipeline call arguments (e.g. ConsisID's face embeddings), prepared before the run.
    A :class:`ConfigError` exits with status 2 after one ``error:`` line (see the module doc)."""
    parser = xFuserArgs.add_cli_args(argparse.ArgumentParser(description=description))
    parser.add_argument("--output_dir", "--output-dir", default="results",
                        help="where images and stats go; created and checked writable before the model loads (results)")
    if add_args is not None:
        add_args(parser)
    ns = parser.parse_args(argv)
    try:
        engine, inputs = xFuserArgs.from_cli_args(ns).create_config()  # validates before any model loads
        out_dir = check_output_dir(ns.output_dir)
        pipe = load_pipeline(pipeline_cls, engine)
        return _run(pipe, engine, inputs, ns, out_dir, model_name, call_inputs)
    except ConfigError as exc:
        exit_with_error(exc)


def _run(pipe, engine, inputs, ns, out_dir: Path, model_name: str, call_inputs) -> dict[str, Any]:
    from xfuser.core.distributed import destroy_distributed_environment, get_dp_group
    from xfuser.parallel import xDiTParallel

    try:
        runner = xDiTParallel(pipe, engine, inputs)
        runner(**(call_inputs(ns, pipe) if call_inputs is not None else {}))
        name = output_name(model_name, engine)
        report: dict[str, Any] = {"latency_s": runner.latency_s, "model": engine.model_config.model}
        report["images"] = runner.save(out_dir, name)
        if runner.is_output_rank and inputs.output_type != "pil":
            dp = get_dp_group()
            report["images"] = save_arrays(runner.output, out_dir, name, inputs.output_type, dp.rank_in_group, dp.world_size)
            logger.info("--output_type %s: saved %s (only pil output is written as PNG/GIF)",
                        inputs.output_type, ", ".join(report["images"]) or "nothing (the pipeline returned no images)")
        if runner.is_output_rank and engine.cache_config.enabled:
            stats = runner.get_cache_statistics()
            report["cache"] = {k: stats[k] for k in ("method", "hit_ratio", "compute_fraction", "flops_skipped_fraction")}
            stats_path = out_dir / f"{name}_stats.json"
            stats_path.write_text(strict_json.dumps(stats, indent=2))
            report["stats_file"] = str(stats_path)
        if runner.peak_memory is not None:  # the generation's high-water mark on this rank's device
            report["peak_memory"] = runner.peak_memory.as_dict()
        if runner.is_output_rank:  # the rank that saved: one summary per data-parallel replica
            logger.info("%s: latency %.2fs %s", name, runner.latency_s,
                        json.dumps({k: v for k, v in report.items() if k not in ("model", "latency_s")}))
        return report
    finally:
        destroy_distributed_environment()
