#!/usr/bin/env bash
# Training-step benchmark: per method (rescale, sCM, MeanFlow, MeanFlow+CFG) the teacher forward, JVP pass,
# gradient pass and whole step as multiples of one teacher forward, peak memory (measured and planned by
# training/memory_plan.py) and images/s. Writes OUT/train_step.json and OUT/train_step.md.
# Usage: bash script/benchmark.sh [OUT] [extra flags of python -m benchmarks.train_step]
#   default OUT docs/benchmarks; CPU configs tiny, medium-256, medium-1024, long (about 30 min on 2 idle cores).
#   On a GPU machine: bash script/benchmark.sh docs/benchmarks/gpu --device cuda --dtype bf16
#   (adds the FLUX.1-lite-8B-shaped configs at 512² and 1024²).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/docs/benchmarks}"
[ $# -gt 0 ] && shift
bash "$ROOT/script/setup_env.sh"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
"$ROOT/.venv/bin/python" -m benchmarks.train_step --output_dir "$OUT" "$@"
