"""Cache methods by name: ``None``, ``Fast``, ``Fb``, ``Tea``."""
from __future__ import annotations

from xfuser.config.config import normalise_method
from xfuser.model_executor.cache.methods.base import CacheMethod, NoCache
from xfuser.model_executor.cache.methods.fast import FastCache
from xfuser.model_executor.cache.methods.fb import FirstBlockCache
from xfuser.model_executor.cache.methods.tea import TeaCache

#: keyed by the names in ``xfuser.config.config.CACHE_METHODS``, the one list of names (kept
#: torch-free so that validating a config imports no model code; a test keeps the two equal)
METHODS: dict[str, type[CacheMethod]] = {m.name: m for m in (NoCache, FastCache, FirstBlockCache, TeaCache)}


def method_class(name: str | None) -> type[CacheMethod]:
    """The class of ``--cache_method`` ``name`` (case-insensitive; ConfigError when unknown)."""
    return METHODS[normalise_method(name)]


__all__ = ["METHODS", "CacheMethod", "FastCache", "FirstBlockCache", "NoCache", "TeaCache", "method_class"]
