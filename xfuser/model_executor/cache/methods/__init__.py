"""Cache methods by name: ``None``, ``Fast``, ``Fb``, ``Tea``."""
from __future__ import annotations

from xfuser.model_executor.cache.methods.base import CacheMethod, NoCache
from xfuser.model_executor.cache.methods.fast import FastCache
from xfuser.model_executor.cache.methods.fb import FirstBlockCache
from xfuser.model_executor.cache.methods.tea import TeaCache

METHODS: dict[str, type[CacheMethod]] = {m.name: m for m in (NoCache, FastCache, FirstBlockCache, TeaCache)}


def method_class(name: str | None) -> type[CacheMethod]:
    key = "None" if name is None else str(name)
    for known, cls in METHODS.items():
        if known.lower() == key.lower():
            return cls
    raise ValueError(f"unknown cache method {name!r} (--cache_method); choose one of {sorted(METHODS)}")


__all__ = ["METHODS", "CacheMethod", "FastCache", "FirstBlockCache", "NoCache", "TeaCache", "method_class"]
