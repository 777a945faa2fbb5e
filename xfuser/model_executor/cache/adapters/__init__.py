"""Block adapters, one module per block family; importing this package registers them all."""
from xfuser.model_executor.cache.adapters import cogvideox, flux, hunyuandit, pixart, stepvideo  # noqa: F401
from xfuser.model_executor.cache.adapters.base import (
    BlockAdapter,
    BlockCall,
    adapter_for,
    register_adapter,
    supported_transformers,
)

__all__ = ["BlockAdapter", "BlockCall", "adapter_for", "register_adapter", "supported_transformers"]
