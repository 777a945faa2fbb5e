"""The one logger of the package: every module logs through ``init_logger(__name__)``.

Why one root: users set the level once (``XFUSER_LOG_LEVEL`` or ``logging.getLogger("xfuser")``)
and multi-rank runs prefix each line with the rank, so interleaved output stays readable.
"""
from __future__ import annotations

import logging
import os

_ROOT = "xfuser"
_configured = False


def launch_rank() -> int:
    """The launcher's global rank (torchrun's ``RANK``; 0 without one or when unreadable): known
    before any process group exists, so start-up messages can be printed by one rank."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = launch_rank()
        return True


def _configure_root() -> None:
    global _configured
    if _configured:
        return
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [rank%(rank)s %(name)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(os.environ.get("XFUSER_LOG_LEVEL", "INFO").upper())
    root.propagate = False
    _configured = True


def init_logger(name: str) -> logging.Logger:
    """Return a logger under the ``xfuser`` root (``name`` is usually ``__name__``)."""
    _configure_root()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


_warned: set[tuple[str, str]] = set()


def warn_once(logger: logging.Logger, message: str, *args) -> None:
    """Log a warning the first time this (logger, formatted message) pair occurs in the process:
    per-patch cache states (PipeFusion) would otherwise repeat configuration warnings."""
    key = (logger.name, message % args if args else message)
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)
