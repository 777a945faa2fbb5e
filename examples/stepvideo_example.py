"""StepVideo text-to-video with caching and USP (and CFG parallel, which our pipeline supports).

    torchrun --nproc_per_node=4 examples/stepvideo_example.py --model /data/stepvideo-pipeline \
        --num_frames 204 --height 544 --width 992 --ulysses_degree 4 --cache_method Fast

``--model`` is a folder saved by ``StepVideoPipeline.save_pretrained``: the official
``transformer/`` weights load as they are, but the official Step-LLM / Hunyuan-CLIP text
encoders and the Step Video-VAE are not ported (see
xfuser/model_executor/models/stepvideo/pipeline.py), so the folder needs Hugging Face text
encoders and a diffusers video VAE beside that transformer. Writes a GIF per prompt.
"""
from xfuser.cli import run_example
from xfuser.model_executor.models.stepvideo import StepVideoPipeline

if __name__ == "__main__":
    run_example(StepVideoPipeline, "stepvideo", description=__doc__)
