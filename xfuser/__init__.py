"""xfuser: cache-accelerated, parallel inference for Diffusion Transformers.

Public API (everything else is internal and may change):
    xFuserArgs, EngineConfig, InputConfig, CacheConfig, ConfigError  -- configuration
    xFuserFastCachePipelineWrapper                                     -- caching on any supported pipeline
    xDiTParallel                                                       -- parallel + cache runner

The pipeline-level names are imported lazily: they pull in diffusers (seconds), which config
validation and ``import xfuser`` should not pay for.
"""
from xfuser.config import CacheConfig, ConfigError, EngineConfig, InputConfig, xFuserArgs

__version__ = "0.1.0"

_LAZY = {
    "xFuserFastCachePipelineWrapper": "xfuser.model_executor.pipelines.fastcache_pipeline",
    "xDiTParallel": "xfuser.parallel",
    **{
        name: "xfuser.model_executor.pipelines.xfuser_pipelines"
        for name in (
            "xFuserPixArtSigmaPipeline", "xFuserPixArtAlphaPipeline", "xFuserFluxPipeline",
            "xFuserHunyuanDiTPipeline", "xFuserCogVideoXPipeline", "xFuserConsisIDPipeline",
        )
    },
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xfuser' has no attribute {name!r}")


__all__ = [
    "CacheConfig",
    "ConfigError",
    "EngineConfig",
    "InputConfig",
    "xDiTParallel",
    "xFuserPixArtSigmaPipeline",
    "xFuserPixArtAlphaPipeline",
    "xFuserFluxPipeline",
    "xFuserArgs",
    "xFuserFastCachePipelineWrapper",
]
