#!/usr/bin/env bash
# Every cache method and the peers on the same prompts and seeds, with a report.
#   bash examples/run_fastcache_benchmark.sh                    # the embedded model (model type pixart)
#   SWEEP=1 bash examples/run_fastcache_benchmark.sh            # the full sweep (thresholds x caps)
#   bash examples/run_fastcache_benchmark.sh pixart-sigma /data/PixArt-Sigma-XL-2-1024-MS
#   bash examples/run_fastcache_benchmark.sh tiny-flux -- --num_inference_steps 3 --repeats 1
# Arguments: MODEL_TYPE [MODEL_DIR_OR_HUB_ID] [-- extra benchmark/cache_execute.py flags].
# Environment:
#   SWEEP=1       the full sweep: our methods at SWEEP_THRESHOLDS x SWEEP_CAPS and every peer at each of
#                 PEER_THRESHOLDS (benchmark/cache_execute.py): 60 configurations for the embedded model,
#                 ~10 min on 2 quiet cores, 15+ min under load.
#                 Default: our methods at DEFAULT_THRESHOLDS without a cap, each peer at threshold 0.1
#                 (TaylorSeer and PAB at their two intervals): 21 configurations, about a third of the sweep
#                 (2 min 42 s measured for the embedded model on 2 lightly loaded cores).
#   STEPS=N       denoising steps (default 20); OUTPUT_DIR=...; PERF_MD=1 also writes docs/performance/<type>.md.
# Flags after `--` come last and win (e.g. `-- --peer_thresholds 0.05 0.1 0.2`).
# Progress is logged as "configuration i of n" with an ETA. results.json is rewritten after every
# finished configuration, so an interrupted run keeps what finished; `python benchmark/report.py
# OUT/results.json` reports on it (the report says it is incomplete).
# Writes fastcache_benchmark_results/<model_type>/: every image, results.json, the comparison
# grid, charts and report.html (and docs/performance/<model_type>.md when PERF_MD=1).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

MODEL_TYPE=${1:-pixart}
shift || true
MODEL_ARGS=()
if [[ $# -gt 0 && "$1" != "--" ]]; then
  MODEL_ARGS=(--model "$1")
  shift
fi
[[ $# -gt 0 && "$1" == "--" ]] && shift
OUT=${OUTPUT_DIR:-fastcache_benchmark_results/$MODEL_TYPE}
STEPS=${STEPS:-20}
SWEEP_ARGS=(--peer_thresholds 0.1)
if [[ "${SWEEP:-0}" == "1" ]]; then
  SWEEP_ARGS=(--sweep)
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python "$ROOT/benchmark/cache_execute.py" --model_type "$MODEL_TYPE" "${MODEL_ARGS[@]}" \
  --cache_methods None Fast Fb Tea "${SWEEP_ARGS[@]}" --num_inference_steps "$STEPS" \
  --output_dir "$OUT" "$@"
REPORT_ARGS=()
if [[ "${PERF_MD:-0}" == "1" ]]; then
  REPORT_ARGS=(--performance_md "$ROOT/docs/performance/$MODEL_TYPE.md")
fi
python "$ROOT/benchmark/report.py" "$OUT/results.json" "${REPORT_ARGS[@]}"
echo "report: $OUT/report.html"
