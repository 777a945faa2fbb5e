"""The cache subsystem: CacheManager + block adapters + methods (Fast, Fb, Tea, None)."""
from xfuser.model_executor.cache.adapters import adapter_for, supported_transformers
from xfuser.model_executor.cache.manager import CacheManager, CachedBlock
from xfuser.model_executor.cache.methods import METHODS, method_class
from xfuser.model_executor.cache.sync import CoordinatorSync, SyncGroup

__all__ = [
    "METHODS",
    "CacheManager",
    "CachedBlock",
    "CoordinatorSync",
    "SyncGroup",
    "adapter_for",
    "method_class",
    "supported_transformers",
]
