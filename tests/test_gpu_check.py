"""The prepared GPU check (tools/gpu_check.sh) keeps working: its smoke run (tiny sizes, CPU)
produces every section with sane numbers, a page renders from the JSON, and the smoke run
leaves the committed docs page alone. A GPU loan is short; a script that rotted in between
would waste it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402

# the CPU smoke run of tools/gpu_check.sh takes ~25-70 s: in the slow suite (.ci/run runs it)
pytestmark = pytest.mark.slow
from gpu_check_page import DOCS_PAGE, placeholder, render  # noqa: E402

SMOKE_TIMEOUT_S = 300  # about 25-60 s on 2 cores (cold inductor cache: the compile sections dominate)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    docs_before = (DOCS_PAGE.read_bytes(), DOCS_PAGE.stat().st_mtime_ns) if DOCS_PAGE.exists() else None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    docs_after = (DOCS_PAGE.read_bytes(), DOCS_PAGE.stat().st_mtime_ns) if DOCS_PAGE.exists() else None
    assert docs_after == docs_before, "a smoke run must not write docs/performance/gpu.md"
    return json.loads((out / "gpu_check.json").read_text()), out


def positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def assert_timing(entry: dict[str, Any], where: str) -> None:
    for key in ("median", "min"):
        assert positive(entry["step_ms"][key]), (where, entry["step_ms"])
        assert positive(entry["generation_ms"][key]), (where, entry["generation_ms"])
    assert positive(entry["mean_step_ms"]), where
    assert positive(entry["peak_memory"]["bytes"]) and entry["peak_memory"]["kind"], where


def assert_cached(entry: dict[str, Any], where: str) -> None:
    assert_timing(entry, where)
    assert entry["schedule_verified"], (where, entry["hit_ratio"], entry["expected_hit_ratio"], entry["schedule"])
    assert 0.0 <= entry["hit_ratio"] <= 1.0 and 0.0 < entry["compute_fraction"] <= 1.0, where
    assert positive(entry["cache_state_bytes"]), where


def test_smoke_sections_have_finite_positive_numbers(smoke):
    doc, _ = smoke
    assert doc["mode"] == "smoke" and doc["finished"]
    assert [s["name"] for s in doc["sections"]] == doc["planned"]
    compile_available = gpu_check.load_compile_blocks() is not None
    for section in doc["sections"]:
        expected = "done" if compile_available or not section["name"].endswith("/compile") else "skipped"
        assert section["status"] == expected, section
    env = doc["environment"]
    assert env["torch"] and env["device_name"] and env["date"] and "commit" in env and "flash_attn" in env
    assert set(doc["models"]) == {"pixart-sigma", "flux"}
    for name, model in doc["models"].items():
        assert positive(model["architecture"]["parameters"])
        for dtype in ("fp32", "bf16"):
            assert_timing(model["uncached"][dtype], f"{name} {dtype}")
        assert set(model["methods"]) == set(gpu_check.METHODS)
        for method, modes in model["methods"].items():
            assert modes["always_compute"]["hit_ratio"] == 0.0
            assert modes["always_skip"]["hit_ratio"] > 0.0
            for mode, entry in modes.items():
                assert_cached(entry, f"{name} {method} {mode}")
        comp = model["compile"]
        if not compile_available:
            assert comp == {"skipped": "compile_blocks not available"}
            continue
        assert comp["compiled_blocks"] == len(model["methods"]["Fast"]["always_compute"]["schedule"][0])
        assert positive(comp["first_call_s"]) and positive(comp["compile_s"])
        assert_timing(comp["uncached"], f"{name} compiled")
        assert_cached(comp["cached"], f"{name} compiled + {comp['cached']['method']}")


def test_page_renders_from_the_json(smoke):
    doc, out = smoke
    page = render(doc)
    assert (out / "gpu.md").read_text() == page
    assert "Smoke run" in page and "bash tools/gpu_check.sh --out /tmp/gpu_check" in page
    for model in doc["models"].values():
        assert model["architecture"]["label"] in page
    for method in gpu_check.METHODS:
        assert f"| {method} |" in page
    assert "Every section ran" in page


def test_page_names_skipped_and_unreached_sections(smoke):
    doc, _ = smoke
    partial = json.loads(json.dumps(doc))
    partial["finished"] = False
    partial["sections"] = partial["sections"][:3]
    partial["sections"][2] = {**partial["sections"][2], "status": "skipped", "reason": "time budget: test"}
    partial["models"]["pixart-sigma"]["methods"]["Fb"] = {"skipped": "time budget: test"}
    page = render(partial)
    assert "stopped before its end" in page and "time budget: test" in page
    assert f"`{doc['planned'][-1]}`: not reached" in page


def test_budget_skips_a_section_with_its_reason(tmp_path):
    doc = {"sections": [], "models": {}, "environment": {}, "settings": {"dtype": "fp32", "steps": 4, "warmup": 1, "repeats": 1},
           "mode": "smoke", "command": "test", "planned": ["slow"]}
    run = gpu_check.Run(tmp_path, budget_s=10.0, doc=doc, pages=[tmp_path / "gpu.md"])
    stored = {}
    ran = run.section("slow", lambda: pytest.fail("must not run"), stored.update, estimate_s=60.0)
    assert not ran and "time budget" in stored["skipped"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"][0]["status"] == "skipped"
    assert "`slow`: skipped" in (tmp_path / "gpu.md").read_text()


def test_cli_refuses_docs_from_a_smoke_run_and_defaults_sizes():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--smoke", "--write-docs"])
    args = gpu_check.parse_args(["--smoke"])
    assert (args.device.type, args.steps, args.write_docs) == ("cpu", 4, False)
    full = gpu_check.flux(smoke=False, depth=None).architecture()
    assert (full["double_blocks"], full["single_blocks"], full["width"], full["image_tokens"]) == (4, 8, 3072, 4096)
    sigma = gpu_check.pixart(smoke=False).architecture()
    assert (sigma["layers"], sigma["width"], sigma["image_tokens"], sigma["text_tokens"]) == (28, 1152, 4096, 300)


def test_placeholder_says_no_gpu_figure_and_how_to_make_one():
    page = placeholder()
    assert "No GPU figure exists yet" in page and "bash tools/gpu_check.sh --out /tmp/gpu_check" in page
