"""Defaults shared by examples, benchmarks and the CLI."""
from __future__ import annotations

from pathlib import Path

#: the embedded trained model (assets/models/...), the default --model everywhere
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "models" / "xfuser-shapes-pixart"


def default_model_path() -> str:
    """The embedded model's directory when the checkout has it, else its repo-relative path."""
    return str(EMBEDDED_MODEL_DIR) if EMBEDDED_MODEL_DIR.exists() else "assets/models/xfuser-shapes-pixart"


DEFAULT_MODEL = default_model_path()
