#!/usr/bin/env bash
# StepVideo under torchrun (see examples/run.sh for every variable). USP only: no CFG parallel,
# no PipeFusion, as in xDiT's table.
#   MODEL_ARGS="--model /data/stepvideo-t2v" N_GPUS=4 PARALLEL_ARGS="--ulysses_degree 4" bash examples/run_stepvideo.sh
set -euo pipefail
export MODEL_TYPE=stepvideo
export TASK_ARGS=${TASK_ARGS:---num_inference_steps 50 --num_frames 204 --height 544 --width 992 --guidance_scale 9.0}
exec bash "$(dirname "$0")/run.sh"
