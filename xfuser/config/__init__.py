"""Configuration: CLI flags (xFuserArgs) and validated configs."""
from xfuser.config.args import xFuserArgs
from xfuser.config.config import (
    CACHE_METHODS,
    CacheConfig,
    ConfigError,
    EngineConfig,
    InputConfig,
    ModelConfig,
    ParallelConfig,
    RuntimeConfig,
    validate_engine_and_input,
)
from xfuser.config.defaults import DEFAULT_MODEL, default_model_path

__all__ = [
    "CACHE_METHODS",
    "DEFAULT_MODEL",
    "CacheConfig",
    "ConfigError",
    "EngineConfig",
    "InputConfig",
    "ModelConfig",
    "ParallelConfig",
    "RuntimeConfig",
    "default_model_path",
    "validate_engine_and_input",
    "xFuserArgs",
]
