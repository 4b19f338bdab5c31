#!/usr/bin/env bash
# The README's first command: set up .venv, then distil the embedded tiny default end to end on CPU
# (no GPU, no downloads) and compare the students with their teacher:
#   the cached shapes-world FLUX teacher (assets/shapes_teacher: a tiny FluxPipeline trained on
#   procedurally drawn shapes; rebuilt by a seeded script if missing, about 2.5 h on one core)
#   → train_rescale.py (time input x1000 → x1) → train_sCM.py and train_meanflow.py
#   → test_flux8b.py / test_sCM.py / test_meanflow.py on held-out GenEval-style prompts
#   → shapes scorer → OUT/table.md, OUT/grid.png, OUT/plot.png, OUT/results.json.
# This is `script/toy_benchmark.sh --quick` (about 10 min on 2 cores); drop --quick for the full
# benchmark. Usage: bash script/quickstart.sh [OUT] [more toy_benchmark flags]
#   OUT defaults to outputs/quickstart; re-running it reuses finished stages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/outputs/quickstart"
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT="$1"; shift; fi
bash "$ROOT/script/setup_env.sh"
exec bash "$ROOT/script/toy_benchmark.sh" "$OUT" --quick "$@"
