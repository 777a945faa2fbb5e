"""StepVideo (stepfun-ai/Step-Video-T2V): transformer (loads the official ``transformer/``
folder) and a minimal text-to-video pipeline around it. The cache adapter lives in
``xfuser.model_executor.cache.adapters.stepvideo``."""
from xfuser.model_executor.models.stepvideo.pipeline import StepVideoPipeline, StepVideoPipelineOutput
from xfuser.model_executor.models.stepvideo.transformer import (
    StepVideoTransformer3DModel,
    StepVideoTransformerBlock,
)

__all__ = [
    "StepVideoPipeline",
    "StepVideoPipelineOutput",
    "StepVideoTransformer3DModel",
    "StepVideoTransformerBlock",
]
