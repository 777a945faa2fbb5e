"""JSON that any parser reads: Python's ``json`` writes ``Infinity``/``NaN``, which is not JSON
(JavaScript's ``JSON.parse``, ``jq`` and most other languages reject the file). PSNR of identical
images is +inf, so results files need it: non-finite floats are written as the strings
``"Infinity"`` / ``"-Infinity"`` and NaN as ``null``; :func:`number` reads them back."""
from __future__ import annotations

import json
import math
from typing import Any

_INF = {"Infinity": math.inf, "-Infinity": -math.inf}


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced (dicts, lists and tuples recursively)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes ``Infinity``/``NaN`` (it raises instead of emitting them)."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def number(value: Any) -> float | None:
    """A float from a results file: numbers as they are, ``"Infinity"``/``"-Infinity"`` as ±inf,
    anything else (missing, null, NaN, text) as None."""
    if isinstance(value, str):
        return _INF.get(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value
