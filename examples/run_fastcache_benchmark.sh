#!/usr/bin/env bash
# Every cache method and the peers on the same prompts and seeds, with a report.
#   bash examples/run_fastcache_benchmark.sh                    # the embedded model (model type pixart)
#   bash examples/run_fastcache_benchmark.sh pixart-sigma /data/PixArt-Sigma-XL-2-1024-MS
#   bash examples/run_fastcache_benchmark.sh tiny-flux -- --num_inference_steps 3 --repeats 1
# Arguments: MODEL_TYPE [MODEL_DIR_OR_HUB_ID] [-- extra benchmark/cache_execute.py flags].
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

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python "$ROOT/benchmark/cache_execute.py" --model_type "$MODEL_TYPE" "${MODEL_ARGS[@]}" \
  --cache_methods None Fast Fb Tea --sweep --num_inference_steps "$STEPS" \
  --output_dir "$OUT" "$@"
REPORT_ARGS=()
if [[ "${PERF_MD:-0}" == "1" ]]; then
  REPORT_ARGS=(--performance_md "$ROOT/docs/performance/$MODEL_TYPE.md")
fi
python "$ROOT/benchmark/report.py" "$OUT/results.json" "${REPORT_ARGS[@]}"
echo "report: $OUT/report.html"
