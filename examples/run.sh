#!/usr/bin/env bash
# Launch an example under torchrun. Override any variable from the environment, e.g.
#   MODEL_TYPE=pixartsigma N_GPUS=4 PARALLEL_ARGS="--ulysses_degree 2" CFG_ARGS="--use_cfg_parallel" \
#   CACHE_ARGS="--cache_method Fast --cache_ratio_threshold 0.05" bash examples/run.sh
#   PARALLEL_ARGS="--pipefusion_parallel_degree 2 --num_pipeline_patch 2 --warmup_steps 1" bash examples/run.sh   # PipeFusion
# On a machine without GPUs the processes use gloo on the CPU (N_GPUS = number of processes).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_TYPE=${MODEL_TYPE:-pixartsigma}          # pixartsigma | pixartalpha | flux | hunyuandit | cogvideox | consisid | stepvideo
N_GPUS=${N_GPUS:-2}
MODEL_ARGS=${MODEL_ARGS:-}                     # e.g. --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --height 1024 --width 1024
PARALLEL_ARGS=${PARALLEL_ARGS:---ulysses_degree 2}
CFG_ARGS=${CFG_ARGS:-}
CACHE_ARGS=${CACHE_ARGS:---cache_method Fast}
TASK_ARGS=${TASK_ARGS:---num_inference_steps 20}

case "$MODEL_TYPE" in
  pixartsigma|pixartalpha|flux|hunyuandit|cogvideox|consisid|stepvideo) SCRIPT="examples/${MODEL_TYPE}_example.py" ;;
  *) echo "unknown MODEL_TYPE '$MODEL_TYPE' (pixartsigma | pixartalpha | flux | hunyuandit | cogvideox | consisid | stepvideo)" >&2; exit 2 ;;
esac

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086  # the *_ARGS variables are word lists on purpose
torchrun --nproc_per_node="$N_GPUS" "$SCRIPT" $MODEL_ARGS $PARALLEL_ARGS $CFG_ARGS $CACHE_ARGS $TASK_ARGS
