"""The bad-input table: every row is refused with its exception type and a message naming the
flag, BEFORE compute (no model loaded for the CLI rows; no transformer / text encoder / VAE
forward for the pipeline rows; no process group for the multi-rank rows). The same table is
rendered to docs/bad_inputs.md; ``XFUSER_REGENERATE_DOCS=1`` rewrites that file, otherwise the
test fails when the committed file and the checks disagree.

Every row runs through its entry point: the pipeline-call rows reach ``check_call_inputs``
through ``xDiTParallel`` (construction and call) or ``xFuserFastCachePipelineWrapper.__call__``.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from xfuser.config import CacheConfig, ConfigError, InputConfig, xFuserArgs
from xfuser.config.defaults import EMBEDDED_MODEL_DIR

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
TMP = "$TMP"  # stands for the module's temporary directory in inputs and messages


@dataclass(frozen=True)
class Row:
    kind: str  # cli | args | cache | input | parallel | call | wrapper | wrapper_call
    payload: Any  # argv, or keyword arguments
    fragment: str  # a substring of the message that names the flag
    exc: type = ConfigError
    model: str = ""  # tiny pipeline of the pipeline rows
    world: int = 1
    overrides: dict = field(default_factory=dict)  # call-time arguments (call / wrapper_call)
    note: str = ""  # shown in the table's input column

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.model}:{self.payload}:{self.overrides}:{self.world}"


def _kw(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def cli(*argv: str, fragment: str, note: str = "") -> Row:
    return Row("cli", tuple(argv), fragment, note=note)


ROWS: list[Row] = [
    # ---- the example entry point (xfuser/cli.py run_example): refused before the model loads
    cli("--max_sequence_length", "100000", fragment="--max_sequence_length 100000"),
    cli("--max_sequence_length", "0", fragment="--max_sequence_length"),
    cli("--guidance_scale", "-3", fragment="--guidance_scale"),
    cli("--negative_prompt", "blurry", "--guidance_scale", "1", fragment="--negative_prompt"),
    cli("--height", "60", fragment="--height 60"),
    cli("--width", "100", fragment="--width 100"),
    cli("--output_dir", f"{TMP}/a_file/out", fragment="--output_dir", note="a path below a regular file"),
    cli("--model", f"{TMP}/no_weights", "--output_dir", f"{TMP}/out", fragment="transformer/ has a config.json but no weights file",
        note="the embedded model without transformer/diffusion_pytorch_model.safetensors (fails in from_pretrained)"),
    cli("--model", "", fragment="--model"),
    cli("--ulysses_degree", "2", fragment="--ulysses_degree"),
    cli("--use_teacache", "--use_fbcache", fragment="--use_teacache"),
    cli("--cache_method", "Fb", "--use_teacache", fragment="--use_teacache"),
    cli("--enable_model_cpu_offload", "--enable_sequential_cpu_offload", fragment="--enable_model_cpu_offload"),
    cli("--fastcache_calibration", "/nonexistent/fastcache.safetensors", fragment="--fastcache_calibration"),
    cli("--collective_timeout", "0", fragment="--collective_timeout"),
    cli("--cache_warmup_steps", "20", "--num_inference_steps", "20", fragment="--cache_warmup_steps"),
    cli("--significance_level", "1.5", fragment="--significance_level"),
    cli("--tea_coefficients", "/nonexistent/coeffs.json", fragment="--tea_coefficients"),
    # ---- xFuserArgs(...).create_config(world_size=N) (tests/test_config.py has these too)
    Row("args", dict(ulysses_degree=2, use_cfg_parallel=True, guidance_scale=4.5), "world size is 2", world=2),
    Row("args", dict(data_parallel_degree=0), "--data_parallel_degree"),
    Row("args", dict(ring_degree=-1), "--ring_degree"),
    Row("args", dict(cache_ratio_threshold=-0.1), "--cache_ratio_threshold"),
    Row("args", dict(cache_ratio_threshold=math.nan), "--cache_ratio_threshold"),
    Row("args", dict(motion_threshold=math.inf), "--motion_threshold"),
    Row("args", dict(significance_level=0.0), "--significance_level"),
    Row("args", dict(cache_method="Foo"), "--cache_method"),
    Row("args", dict(num_inference_steps=0), "--num_inference_steps"),
    Row("args", dict(pipefusion_parallel_degree=2, num_pipeline_patch=1), "--num_pipeline_patch", world=2),
    Row("args", dict(pipefusion_parallel_degree=2, attn_layer_num_for_pp=[4]), "--attn_layer_num_for_pp", world=2),
    Row("args", dict(pipefusion_parallel_degree=2, attn_layer_num_for_pp=[4, 0]), "--attn_layer_num_for_pp", world=2),
    Row("args", dict(height=-64), "--height"),
    Row("args", dict(width=0), "--width"),
    Row("args", dict(use_cfg_parallel=True, guidance_scale=1.0), "--guidance_scale", world=2),
    Row("args", dict(pipefusion_parallel_degree=2, warmup_steps=30, num_inference_steps=20), "--warmup_steps", world=2),
    Row("args", dict(cache_warmup_steps=-1), "--cache_warmup_steps"),
    Row("args", dict(max_cached_steps=-5), "--max_cached_steps"),
    Row("args", dict(pipefusion_parallel_degree=2, height=100, num_pipeline_patch=3), "--height", world=2),
    Row("args", dict(data_parallel_degree=2, prompt=["a", "b", "c"]), "--data_parallel_degree", world=2),
    Row("args", dict(dtype="float8"), "--dtype"),
    Row("args", dict(guidance_scale=math.nan), "--guidance_scale"),
    Row("args", dict(guidance_scale=-3.0), "--guidance_scale"),
    Row("args", dict(prompt=[]), "--prompt"),
    Row("args", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "--negative_prompt gives 3"),
    Row("args", dict(max_sequence_length=-1), "--max_sequence_length"),
    # ---- CacheConfig / InputConfig directly
    Row("cache", dict(method="Foo"), "--cache_method"),
    Row("cache", dict(betas=(0.01, 0.5, -0.002)), "betas"),
    Row("cache", dict(betas=(0.0, 0.5, -0.002, 0.00005)), "betas"),
    Row("cache", dict(approximation="magic"), "approximation"),
    Row("cache", dict(tea_coefficients=[1.0, math.nan]), "--tea_coefficients"),
    Row("cache", dict(max_cached_steps=True), "--max_cached_steps"),
    Row("cache", dict(ridge=-1.0), "ridge"),
    Row("cache", dict(calibration="/nonexistent/fastcache.safetensors"), "--fastcache_calibration"),
    Row("input", dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "--negative_prompt gives 3"),
    Row("input", dict(negative_prompt="blurry", guidance_scale=0.5), "--negative_prompt"),
    Row("input", dict(negative_prompt=7), "--negative_prompt"),
    Row("input", dict(output_type="png"), "--output_type"),
    Row("input", dict(guidance_scale="high"), "--guidance_scale"),
    Row("input", dict(num_frames=0), "--num_frames"),
    Row("input", dict(max_sequence_length=0), "--max_sequence_length"),
    # ---- xDiTParallel(pipe, engine, inputs) on tiny pipelines (engine from xFuserArgs(model="tiny", ...))
    Row("parallel", dict(ulysses_degree=3), "--ulysses_degree 3", model="pixart-sigma", world=3),
    Row("parallel", dict(ring_degree=3, height=32, width=32), "sequence-parallel degree 3", model="pixart-sigma", world=3),
    Row("parallel", dict(use_cfg_parallel=True, guidance_scale=3.5), "--use_cfg_parallel", model="flux", world=2),
    Row("parallel", dict(ulysses_degree=2, max_sequence_length=15), "--max_sequence_length 15", model="flux", world=2),
    Row("parallel", dict(pipefusion_parallel_degree=2), "--pipefusion_parallel_degree", model="cogvideox", world=2),
    Row("parallel", dict(pipefusion_parallel_degree=2, ring_degree=2), "--ring_degree", model="pixart-sigma", world=4),
    Row("parallel", dict(use_parallel_vae=True), "--use_parallel_vae", model="pixart-sigma"),
    Row("parallel", dict(height=36, width=32), "--height 36", model="pixart-sigma"),
    Row("parallel", dict(height=16, width=18), "--width 18", model="flux"),
    Row("parallel", dict(max_sequence_length=100000), "--max_sequence_length 100000", model="pixart-sigma"),
    Row("parallel", dict(max_sequence_length=1000), "--max_sequence_length 1000", model="flux"),
    Row("parallel", dict(max_sequence_length=64), "--max_sequence_length 64", model="hunyuandit"),
    Row("parallel", dict(negative_prompt="blurry"), "--negative_prompt", model="flux"),
    Row("parallel", dict(num_frames=9), "--num_frames", model="pixart-sigma"),
    Row("call", dict(), "--negative_prompt gives 3", model="pixart-sigma",
        overrides=dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"])),
    # ---- xFuserFastCachePipelineWrapper(pipe).enable_cache(...) / wrapper(...)
    Row("wrapper", dict(method="Foo"), "--cache_method", model="pixart-sigma"),
    Row("wrapper", dict(method="Fast", cache_ratio_threshold=-1.0), "--cache_ratio_threshold", model="pixart-sigma"),
    Row("wrapper", dict(method="Fb", max_cached_steps=-2), "--max_cached_steps", model="flux"),
    Row("wrapper", dict(method="Fast", calibration="/nonexistent/fastcache.safetensors"), "--fastcache_calibration",
        model="pixart-sigma"),
    Row("wrapper_call", {}, "num_inference_steps=0", model="pixart-sigma", overrides=dict(num_inference_steps=0)),
    Row("wrapper_call", {}, "--negative_prompt gives 3", model="pixart-sigma",
        overrides=dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"])),
    Row("wrapper_call", {}, "--max_sequence_length 100000", model="pixart-sigma",
        overrides=dict(max_sequence_length=100000)),
    Row("wrapper_call", {}, "--height 36", model="pixart-sigma", overrides=dict(height=36)),
    Row("wrapper_call", {}, "--guidance_scale", model="pixart-sigma", overrides=dict(guidance_scale=-3.0)),
    Row("wrapper_call", {}, "--negative_prompt", model="pixart-sigma",
        overrides=dict(negative_prompt="blurry", guidance_scale=1.0)),
    Row("wrapper_call", {}, "--negative_prompt", model="flux", overrides=dict(negative_prompt="blurry")),
]


# ------------------------------------------------------------------ how a row is run
class _ForbiddenPipeline:
    """Stands in for the pipeline class of the CLI rows: loading it fails the test."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise AssertionError("the model was loaded: the input was not refused before loading")


@contextlib.contextmanager
def no_compute(pipe):
    """Fail the test if any model of ``pipe`` runs a forward."""
    handles = []
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue

        def forbid(*_args, _name=name):
            raise AssertionError(f"{_name} ran a forward: the input was not refused before compute")

        handles.append(module.register_forward_pre_hook(forbid))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _sub(value: Any, tmp: Path) -> Any:
    return value.replace(TMP, str(tmp)) if isinstance(value, str) else value


@dataclass
class Outcome:
    exc: BaseException
    message: str


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pipes: dict[str, Any] = {}
        self.outcomes: dict[str, Outcome] = {}
        (tmp / "a_file").write_text("not a directory")
        broken = tmp / "no_weights"
        shutil.copytree(EMBEDDED_MODEL_DIR, broken)
        (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()

    def pipe(self, model_type: str):
        if model_type not in self.pipes:
            from xfuser.testing.tiny_pipelines import build_tiny_pipeline

            self.pipes[model_type] = build_tiny_pipeline(model_type)
            self.pipes[model_type].set_progress_bar_config(disable=True)
        return self.pipes[model_type]

    def outcome(self, row: Row) -> Outcome:
        if row.id not in self.outcomes:
            self.outcomes[row.id] = self._run(row)
        return self.outcomes[row.id]

    def _run(self, row: Row) -> Outcome:
        try:
            if row.kind == "cli":
                return self._run_cli(row)
            if row.kind == "args":
                xFuserArgs(**row.payload).create_config(world_size=row.world)
            elif row.kind == "cache":
                CacheConfig(**row.payload)
            elif row.kind == "input":
                InputConfig(**row.payload)
            else:
                pipe = self.pipe(row.model)
                with no_compute(pipe):
                    self._run_pipeline(row, pipe)
        except Exception as exc:  # noqa: BLE001 - the row's assertion checks the type
            return Outcome(exc, str(exc))
        raise AssertionError(f"{row.id} was accepted")

    def _run_cli(self, row: Row) -> Outcome:
        from xfuser.cli import run_example

        argv = [_sub(a, self.tmp) for a in row.payload]
        uses_model = any(a.endswith("no_weights") for a in argv)
        pipeline_cls = _ForbiddenPipeline
        if uses_model:
            from diffusers import PixArtSigmaPipeline

            pipeline_cls = PixArtSigmaPipeline
        err = io.StringIO()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
        with mock.patch.dict(os.environ, env, clear=True), contextlib.redirect_stderr(err):
            try:
                run_example(pipeline_cls, "bad", argv=argv)
            except SystemExit as exc:
                text = err.getvalue()
                if uses_model:  # diffusers' / transformers' loading progress bars share stderr; not ours
                    text = "\n".join(line for line in text.replace("\r", "\n").splitlines()
                                      if line.strip() and not re.search(r"\d+%\|", line))
                lines = text.strip().splitlines()
                assert exc.code == 2, f"exit status {exc.code}"
                assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr was {err.getvalue()!r}"
                assert "Traceback" not in err.getvalue()
                cause = exc.__context__
                assert isinstance(cause, ConfigError), f"exit 2 without a ConfigError: {cause!r}"
                return Outcome(cause, lines[0][len("error: "):])
        raise AssertionError(f"{argv} was accepted")

    def _engine(self, row: Row):
        return xFuserArgs(model="tiny", **row.payload).create_config(world_size=row.world)

    def _run_pipeline(self, row: Row, pipe) -> None:
        from xfuser.model_executor.pipelines.fastcache_pipeline import xFuserFastCachePipelineWrapper
        from xfuser.parallel import xDiTParallel

        if row.kind in ("parallel", "call"):
            engine, inputs = self._engine(row)
            patch = mock.patch(
                "xfuser.parallel.init_distributed_environment",
                side_effect=AssertionError("process groups were created: the input was not refused before"),
            ) if row.world > 1 else contextlib.nullcontext()
            with patch:
                runner = xDiTParallel(pipe, engine, inputs)
            try:
                if row.kind == "call":
                    runner(**row.overrides)
            finally:
                runner.close()
        elif row.kind == "wrapper":
            with xFuserFastCachePipelineWrapper(pipe) as wrapper:
                wrapper.enable_cache(**row.payload)
        elif row.kind == "wrapper_call":
            from xfuser.testing.tiny_pipelines import tiny_call_kwargs

            with xFuserFastCachePipelineWrapper(pipe) as wrapper:
                wrapper.enable_cache("Fast")
                wrapper(**{**tiny_call_kwargs(row.model), **row.overrides})
        else:
            raise ValueError(row.kind)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    from xfuser.core.distributed import destroy_distributed_environment

    destroy_distributed_environment()
    yield Harness(tmp_path_factory.mktemp("bad_inputs"))
    destroy_distributed_environment()


# ------------------------------------------------------------------ the table and the doc
def label(row: Row) -> str:
    if row.kind == "cli":
        text = f"`example {shlex.join(row.payload)}`"
    elif row.kind == "args":
        text = f"`xFuserArgs({_kw(row.payload)})`" + (f", world size {row.world}" if row.world > 1 else "")
    elif row.kind == "cache":
        text = f"`CacheConfig({_kw(row.payload)})`"
    elif row.kind == "input":
        text = f"`InputConfig({_kw(row.payload)})`"
    elif row.kind in ("parallel", "call"):
        text = f"`xDiTParallel(tiny {row.model}, xFuserArgs({_kw(row.payload)}))`"
        if row.world > 1:
            text += f", world size {row.world}"
        if row.kind == "call":
            text += f", then `runner({_kw(row.overrides)})`"
    elif row.kind == "wrapper":
        text = f"`xFuserFastCachePipelineWrapper(tiny {row.model}).enable_cache({_kw(row.payload)})`"
    else:
        text = f"`wrapper(<tiny {row.model} call>, {_kw(row.overrides)})`"
    return text + (f" ({row.note})" if row.note else "")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render(outcomes: list[tuple[Row, Outcome]], tmp: Path) -> str:
    lines = [
        "# Bad inputs and what they print",
        "",
        "Generated by `tests/test_bad_inputs.py` from its table; do not edit by hand. "
        "`XFUSER_REGENERATE_DOCS=1 python -m pytest -q tests/test_bad_inputs.py` rewrites it, and the test "
        "fails whenever this file and the checks disagree.",
        "",
        "Every input below is refused before compute: the CLI rows (`example` = any "
        "`examples/<model>_example.py`, i.e. `xfuser.cli.run_example`) before the model loads, except the "
        "missing weights file, which `from_pretrained` finds; the pipeline rows before any transformer, text "
        "encoder or VAE forward, and the multi-rank rows before any process group exists. The example entry "
        "points print the message as one line `error: <message>` on rank 0 and exit with status 2 on every "
        "rank; the Python API raises `ConfigError` (a `ValueError`). `$TMP` is a temporary directory.",
        "",
        "`--output_type` other than `pil` is not an error: the example entry points save `np` as `.npy` and "
        "`pt`/`latent` as `.pt` in `--output_dir` and say so in one line.",
        "",
        "| input | message |",
        "|---|---|",
    ]
    for row, outcome in outcomes:
        message = outcome.message.replace(str(tmp), TMP)
        lines.append(f"| {_cell(label(row))} | {_cell(message)} |")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("row", ROWS, ids=[f"{i:02d}-{r.kind}" for i, r in enumerate(ROWS)])
def test_bad_input_is_refused_before_compute_naming_the_flag(harness, row):
    outcome = harness.outcome(row)
    if isinstance(outcome.exc, AssertionError):
        raise outcome.exc
    assert isinstance(outcome.exc, row.exc), f"{type(outcome.exc).__name__}: {outcome.message}"
    assert row.fragment in outcome.message


def test_the_table_is_big_enough():
    assert len(ROWS) >= 40
    assert len({r.id for r in ROWS}) == len(ROWS), "duplicate rows"


def test_docs_bad_inputs_md_matches_the_table(harness):
    outcomes = [(row, harness.outcome(row)) for row in ROWS]
    bad = [(r.id, o.message) for r, o in outcomes if isinstance(o.exc, AssertionError) or r.fragment not in o.message]
    assert not bad, f"rows failing their own check: {bad}"
    text = render(outcomes, harness.tmp)
    if os.environ.get("XFUSER_REGENERATE_DOCS") == "1":
        DOC.write_text(text)
    assert DOC.is_file(), f"{DOC} is missing; run with XFUSER_REGENERATE_DOCS=1"
    assert DOC.read_text() == text, f"{DOC} is out of date; run with XFUSER_REGENERATE_DOCS=1 and commit it"


# ------------------------------------------------------------------ the example entry's behaviour
def test_cli_error_prints_nothing_on_other_ranks_and_exits_2():
    from xfuser.cli import run_example

    err = io.StringIO()
    with mock.patch.dict(os.environ, {"RANK": "1"}), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        run_example(_ForbiddenPipeline, "bad", argv=["--guidance_scale", "-3"])
    assert info.value.code == 2
    assert err.getvalue() == ""


def test_cli_saves_np_output_and_logs_the_summary_on_the_output_rank(tmp_path):
    import numpy as np
    from diffusers import PixArtSigmaPipeline

    import xfuser.cli as cli

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    with mock.patch.dict(os.environ, {**env, "XFUSER_PROGRESS": "0"}, clear=True), \
            mock.patch.object(cli.logger, "info") as info:
        report = cli.run_example(PixArtSigmaPipeline, "shapes", argv=[
            "--num_inference_steps", "2", "--output_type", "np", "--cache_method", "None",
            "--output_dir", str(tmp_path / "out"),
        ])
    (path,) = report["images"]
    assert path.endswith(".npy")
    array = np.load(path)
    assert array.shape == (1, 64, 64, 3)
    logged = [call.args[0] % call.args[1:] for call in info.call_args_list]
    assert any("--output_type np: saved" in line and path in line for line in logged), logged
    assert any("latency" in line and path in line for line in logged), logged


# ------------------------------------------------------------------ the pre-load file checks accept valid input
def _fake_model(root: Path, class_name: str, sample_size: int, tokenizer: dict | None, encoder: dict | None,
                two_tokenizers: bool = False) -> Path:
    import json

    files = {
        "model_index.json": {"_class_name": class_name, **({"tokenizer_2": ["x", "y"]} if two_tokenizers else {})},
        "vae/config.json": {"block_out_channels": [8, 16, 32, 64]},  # 8x
        "transformer/config.json": {"patch_size": 2, "sample_size": sample_size},
    }
    suffix = "_2" if two_tokenizers else ""
    if tokenizer is not None:
        files[f"tokenizer{suffix}/tokenizer_config.json"] = tokenizer
    if encoder is not None:
        files[f"text_encoder{suffix}/config.json"] = encoder
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))
    return root


def test_file_checks_follow_binning_the_tokenizer_sentinel_and_the_second_tokenizer(tmp_path):
    from xfuser.config.model_files import size_unit_from_files, text_token_limit_from_files

    # PixArt with a binned sample size snaps any size to its table: no size check
    binned = _fake_model(tmp_path / "binned", "PixArtSigmaPipeline", 128, {"model_max_length": 300}, None)
    assert size_unit_from_files(str(binned)) is None
    xFuserArgs(model=str(binned), height=1000, width=1000).create_config(world_size=1)
    # the same model with an unbinned sample size: 8x VAE x patch 2 = 16 px per token
    plain = _fake_model(tmp_path / "plain", "PixArtSigmaPipeline", 16, {"model_max_length": 300}, None)
    assert size_unit_from_files(str(plain))[0] == 16
    xFuserArgs(model=str(plain), height=1024, width=992, max_sequence_length=300).create_config(world_size=1)
    with pytest.raises(ConfigError, match="--max_sequence_length 301"):
        xFuserArgs(model=str(plain), max_sequence_length=301).create_config(world_size=1)
    # Flux packs 2x2: 8x VAE x patch 2 x 2; T5 is tokenizer_2; a tokenizer without a limit stores a
    # huge sentinel, so the text encoder's position limit is used instead
    flux = _fake_model(tmp_path / "flux", "FluxPipeline", 64, {"model_max_length": 10**30}, {"n_positions": 512},
                       two_tokenizers=True)
    assert size_unit_from_files(str(flux))[0] == 32
    assert text_token_limit_from_files(str(flux)) == (512, "text_encoder_2/config.json")
    with pytest.raises(ConfigError, match="--height 48"):
        xFuserArgs(model=str(flux), height=48, width=64).create_config(world_size=1)
    # nothing known: nothing refused here (the call-time checks still run)
    unknown = _fake_model(tmp_path / "unknown", "PixArtSigmaPipeline", 16, None, None)
    assert text_token_limit_from_files(str(unknown)) is None
    xFuserArgs(model=str(unknown), max_sequence_length=100000).create_config(world_size=1)


def test_call_checks_accept_what_the_pipelines_accept(harness):
    from xfuser.model_executor.pipelines.input_checks import check_call_inputs
    from xfuser.testing.tiny_pipelines import tiny_call_kwargs

    for model in ("pixart-sigma", "flux", "hunyuandit"):
        pipe = harness.pipe(model)
        check_call_inputs(pipe, tiny_call_kwargs(model))
    pixart = harness.pipe("pixart-sigma")
    check_call_inputs(pixart, {**tiny_call_kwargs("pixart-sigma"), "prompt": ["a", "b"], "negative_prompt": ["x", "y"]})
    check_call_inputs(pixart, {**tiny_call_kwargs("pixart-sigma"), "negative_prompt": "x", "max_sequence_length": 512})
    # resolution binning on: the pipeline snaps the size itself
    check_call_inputs(pixart, {**tiny_call_kwargs("pixart-sigma"), "height": 36, "use_resolution_binning": True})
    flux = harness.pipe("flux")
    check_call_inputs(flux, {**tiny_call_kwargs("flux"), "negative_prompt": "x", "true_cfg_scale": 2.0})


# ------------------------------------------------------------------ under torchrun (slow: two launches)
@pytest.mark.slow
def test_torchrun_error_is_one_line_and_the_summary_comes_from_each_replicas_output_rank(tmp_path):
    from xfuser.testing.multiprocess import run_torchrun

    bad = run_torchrun(["examples/pixartsigma_example.py", "--data_parallel_degree", "2", "--guidance_scale", "-3"],
                       nproc_per_node=2, timeout_s=240)
    assert bad.returncode != 0
    output = bad.stdout + bad.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --guidance_scale must be >= 0, got -3.0; use 0-1 for no guidance, > 1 for CFG"], output
    assert "xfuser/" not in output, "a traceback through xfuser was printed"  # torchrun's own summary stays
    assert "exitcode  : 2" in output

    out = tmp_path / "out"
    good = run_torchrun([
        "examples/pixartsigma_example.py", "--data_parallel_degree", "2", "--prompt", "a red circle", "a blue square",
        "--num_inference_steps", "2", "--cache_method", "None", "--output_dir", str(out),
    ], nproc_per_node=2, timeout_s=240, env={"XFUSER_PROGRESS": "0"})
    assert good.returncode == 0, good.stderr[-3000:]
    summaries = [line for line in (good.stdout + good.stderr).splitlines() if "latency" in line and '"images"' in line]
    assert len(summaries) == 2, summaries
    for replica in (0, 1):
        assert any(f"_dp{replica}_0.png" in line for line in summaries), summaries
