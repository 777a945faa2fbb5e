#!/usr/bin/env bash
# ConsisID under torchrun (see examples/run.sh for every variable); needs a face:
#   MODEL_ARGS="--model BestWishYsh/ConsisID-preview --img_file_path face.png" N_GPUS=4 \
#   PARALLEL_ARGS="--ulysses_degree 2" CFG_ARGS="--use_cfg_parallel" bash examples/run_consisid.sh
set -euo pipefail
export MODEL_TYPE=consisid
export TASK_ARGS=${TASK_ARGS:---num_inference_steps 50 --num_frames 49 --height 480 --width 720 --guidance_scale 6.0}
exec bash "$(dirname "$0")/run.sh"
