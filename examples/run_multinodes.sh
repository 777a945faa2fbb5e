#!/usr/bin/env bash
# Multi-node launch: run this on every node with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 N_GPUS=8 PARALLEL_ARGS="--ulysses_degree 8 --data_parallel_degree 2" \
#   bash examples/run_multinodes.sh
# Rank order is SP fastest, so keep --ulysses_degree x --ring_degree within a node for the all-to-all.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_TYPE=${MODEL_TYPE:-pixartsigma}
N_GPUS=${N_GPUS:-8}
NNODES=${NNODES:?set NNODES}
NODE_RANK=${NODE_RANK:?set NODE_RANK}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
MASTER_PORT=${MASTER_PORT:-29500}
MODEL_ARGS=${MODEL_ARGS:-}
PARALLEL_ARGS=${PARALLEL_ARGS:---ulysses_degree 8}
CFG_ARGS=${CFG_ARGS:-}
CACHE_ARGS=${CACHE_ARGS:---cache_method Fast}
TASK_ARGS=${TASK_ARGS:---num_inference_steps 20}

# shellcheck disable=SC2086
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$N_GPUS" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  "examples/${MODEL_TYPE}_example.py" $MODEL_ARGS $PARALLEL_ARGS $CFG_ARGS $CACHE_ARGS $TASK_ARGS
