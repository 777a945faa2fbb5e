"""xfuser: cache-accelerated, parallel inference for Diffusion Transformers.

Public API (everything else is internal and may change):
    xFuserArgs, EngineConfig, InputConfig, CacheConfig, ConfigError  -- configuration
    xFuserFastCachePipelineWrapper                                     -- caching on any supported pipeline
"""
from xfuser.config import CacheConfig, ConfigError, EngineConfig, InputConfig, xFuserArgs
from xfuser.model_executor.pipelines.fastcache_pipeline import xFuserFastCachePipelineWrapper

__version__ = "0.1.0"

__all__ = [
    "CacheConfig",
    "ConfigError",
    "EngineConfig",
    "InputConfig",
    "xFuserArgs",
    "xFuserFastCachePipelineWrapper",
]
