"""TeaCache calibration command: fits a polynomial on real step pairs and feeds --tea_coefficients."""
from __future__ import annotations

import json

import numpy as np

from xfuser import xFuserArgs
from xfuser.model_executor.cache.calibrate import load_coefficients, main
from xfuser.testing.tiny_pipelines import save_tiny_pipeline


def test_calibrate_writes_a_fit_that_the_cli_accepts(tmp_path):
    model = save_tiny_pipeline("pixart-sigma", tmp_path / "model")
    out = tmp_path / "coeffs.json"
    assert main(["--model", str(model), "--out", str(out), "--num_inference_steps", "8", "--prompts", "a red circle", "a blue square",
                 "--height", "32", "--width", "32"]) == 0
    data = json.loads(out.read_text())
    assert data["family"] == "pixart" and data["num_points"] == 2 * 7 and len(data["coefficients"]) == 5
    coeffs = load_coefficients(out)
    assert all(np.isfinite(coeffs))
    engine, _ = xFuserArgs(model=str(model), cache_method="Tea", tea_coefficients=str(out)).create_config(world_size=1)
    assert engine.cache_config.tea_coefficients == coeffs
