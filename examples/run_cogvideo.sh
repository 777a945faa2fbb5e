#!/usr/bin/env bash
# CogVideoX / CogVideoX1.5 under torchrun (see examples/run.sh for every variable).
#   MODEL_ARGS="--model THUDM/CogVideoX1.5-5B" N_GPUS=4 PARALLEL_ARGS="--ulysses_degree 2" CFG_ARGS="--use_cfg_parallel" \
#   bash examples/run_cogvideo.sh
# The SP degree must divide the 226 text tokens (degree 2); add CFG parallel for 4 ranks.
set -euo pipefail
export MODEL_TYPE=cogvideox
export TASK_ARGS=${TASK_ARGS:---num_inference_steps 50 --num_frames 81 --height 768 --width 1360 --guidance_scale 6.0}
exec bash "$(dirname "$0")/run.sh"
