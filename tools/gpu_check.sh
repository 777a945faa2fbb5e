#!/usr/bin/env bash
# One prepared device check: CUDA-path latency, cache overhead/ceiling, torch.compile, dtypes
# and peak memory of full-width random PixArt-Σ and FLUX.1 transformers, no hub needed.
#   bash tools/gpu_check.sh --out /tmp/gpu_check      # on a CUDA machine (≤ 8 min); writes docs/performance/gpu.md
#   bash tools/gpu_check.sh --smoke --out /tmp/smoke  # tiny sizes on CPU (CI); never touches docs/
# Options: see `python tools/gpu_check.py --help`.
set -euo pipefail
exec python "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
