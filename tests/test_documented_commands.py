"""Every command README.md shows, and the upstream (FastCache-xDiT) spellings users already know,
run as written with only smoke flags appended (few steps; the embedded 64 px model), and fail
when one breaks. A README command missing from ``README_COMMANDS`` fails the first test, so a
new documented command cannot go untested."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xfuser.config.defaults import EMBEDDED_MODEL_DIR
from xfuser.testing.multiprocess import run_torchrun

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--num_inference_steps", "2"]

#: README command (continuation lines joined, ``pip install ... &&`` dropped) -> how the test
#: runs it: ``("run", smoke args)``, or ``("covered", "tests/<file>::<test>")`` for a command
#: with its own test (the suite itself, GPU-only commands with a CPU smoke test)
README_COMMANDS: dict[str, tuple[str, object]] = {
    "python examples/pixartsigma_example.py": ("run", SMOKE),
    "OMP_NUM_THREADS=1 python -m pytest -q": ("covered", "tests/ (this suite; .ci/run runs it)"),
    "pip install -r requirements-gpu.txt -e .": ("covered", "tests/test_gpu_check.py (GPU install; not on CPU)"),
    'pip install -e ".[flash-attn]"': ("covered", "tests/test_attention_backend.py (needs a CUDA toolchain)"),
    "bash tools/gpu_check.sh --out /tmp/gpu_check": ("covered", "tests/test_gpu_check.py (GPU only; --smoke on CPU)"),
    "bash tools/gpu_check.sh --smoke --out /tmp/gpu_smoke": ("covered", "tests/test_gpu_check.py"),
    "python -m xfuser.model_executor.cache.calibrate --model <dir> --method Fast [--prompts-file prompts.txt] "
    "[--num_inference_steps 20]": ("run", ["--num_inference_steps", "4"]),
    "python -m xfuser.model_executor.cache.calibrate --model <dir> --method Tea --out coeffs.json": (
        "run", ["--num_inference_steps", "6"]),  # the fit needs degree + 2 steps
    "torchrun --nproc_per_node=4 examples/pixartsigma_example.py --ulysses_degree 2 --use_cfg_parallel "
    "--guidance_scale 2 --cache_method Fast --debug_cache_agreement": ("run", SMOKE),
    "torchrun --nproc_per_node=2 examples/pixartsigma_example.py --pipefusion_parallel_degree 2 "
    "--num_pipeline_patch 2 --warmup_steps 1 --cache_method Fb --cache_ratio_threshold 0.5": ("run", SMOKE),
}


def readme_commands() -> list[str]:
    """Shell commands of README.md's ``bash`` blocks: comments dropped, continuations joined,
    ``pip install ... &&`` prefixes dropped (the install is this machine's)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if not line or line.startswith("#"):
                continue
            if "&&" in line and line.startswith("pip install"):
                line = line.split("&&", 1)[1].strip()
            commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_has_a_test():
    found = readme_commands()
    assert found, "no bash block found in README.md"
    unknown = [c for c in found if c not in README_COMMANDS]
    assert not unknown, f"README commands without a test here (add them to README_COMMANDS): {unknown}"
    stale = [c for c in README_COMMANDS if c not in found]
    assert not stale, f"README_COMMANDS lists commands README.md no longer shows: {stale}"
    for command, (how, where) in README_COMMANDS.items():
        if how == "covered":
            assert (ROOT / str(where).split(" ")[0].split("::")[0]).exists(), (command, where)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "XFUSER_PROGRESS": "0"}


def _run(argv: list[str], cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    if argv[0] == "torchrun":
        nproc = int(argv[1].split("=")[1])
        return run_torchrun(argv[2:], nproc_per_node=nproc, timeout_s=timeout_s, cwd=cwd)
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout_s)


RUNNABLE = [
    # the torchrun commands take 20-40 s each on 2 cores: in the slow suite (.ci/run runs it)
    pytest.param(c, marks=pytest.mark.slow) if c.startswith("torchrun") else c
    for c, (how, _) in README_COMMANDS.items() if how == "run"
]


@pytest.mark.parametrize("command", RUNNABLE, ids=lambda c: re.sub(r"[^A-Za-z0-9]+", "-", c.replace("python -m xfuser.model_executor.cache.", ""))[:60])
def test_readme_command_runs_as_written(command, tmp_path):
    """Run from a scratch copy of the repository's root layout (the README's relative paths),
    with the embedded model as ``<dir>``; outputs land in the scratch directory."""
    model = tmp_path / "model"
    shutil.copytree(EMBEDDED_MODEL_DIR, model)
    text = command.replace("<dir>", str(model))
    text = re.sub(r"\s*\[[^\]]*\]", "", text)  # optional parts of a usage line
    argv = [str(ROOT / a) if a.startswith(("examples/", "tools/", "benchmark/")) else a for a in shlex.split(text)]
    argv += README_COMMANDS[command][1]
    if "_example.py" in command:
        argv += ["--output_dir", str(tmp_path / "results")]
    proc = _run(argv, cwd=tmp_path)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    if "_example.py" in command:
        assert list((tmp_path / "results").glob("*.png")), "the example saved no image"
    if "--method Fast" in command:
        assert (model / "fastcache.safetensors").is_file()
    if "--out coeffs.json" in command:
        assert (tmp_path / "coeffs.json").is_file()


# ---------------------------------------------------------------------------- upstream spellings
def test_upstream_parallel_benchmark_command(tmp_path):
    """FastCache-xDiT's ``cache_execution_xfuser.py --model_type pixart ...`` (before: "unrecognized
    arguments: --model_type"; results with a bare Infinity and no images)."""
    import json

    out = tmp_path / "test_results"
    proc = _run(["python", str(ROOT / "benchmark/cache_execution_xfuser.py"), "--model_type", "pixart",
                 "--cache_methods", "Fast", "--num_inference_steps", "3", "--height", "64", "--width", "64",
                 "--output_dir", str(out), "--repeats", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results_parallel.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"results_parallel.json is not strict JSON: {c}"))
    assert report["model"] == str(EMBEDDED_MODEL_DIR)
    assert set(report["images"]) == {"None", "Fast"} and all((out / p).is_file() for p in report["images"].values())


def test_upstream_single_image_command_offline_ends_in_one_line(tmp_path):
    """``run_fastcache_test.py --model_type pixart --model "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"``
    offline: one ``error:`` line naming the model and what to pass instead (before: a 90-line
    traceback ending in diffusers' "pass local_files_only=False")."""
    proc = _run(["python", str(ROOT / "examples/run_fastcache_test.py"), "--model_type", "pixart", "--model",
                 "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "--output_dir", str(tmp_path)], cwd=tmp_path, timeout_s=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert str(EMBEDDED_MODEL_DIR) in errors[0] and "--model_type tiny-" in errors[0]
