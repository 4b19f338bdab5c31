#!/usr/bin/env bash
# Shapes-world distillation benchmark on CPU, end to end through the real CLIs:
#   cached teacher (assets/shapes_teacher) -> train_rescale.py -> train_sCM.py + train_meanflow.py
#   -> test_flux8b.py / test_sCM.py / test_meanflow.py on held-out prompts -> shapes scorer
#   -> OUT/results.json, OUT/table.md, OUT/grid.png, OUT/plot.png
# Usage: bash script/toy_benchmark.sh [OUT] [--quick] [--ablations all|GROUP,...] [more evaluation.shapes.benchmark flags]
#   --ablations: also train and score one-option variants of the students (docs/toy_benchmark/ablations.md),
#   into OUT/ablations/; `all` adds about 130 core-minutes (14 trainings) to the full run: 2-2.5 h on 2 cores.
#   OUT defaults to outputs/toy_benchmark (outputs/toy_benchmark_quick with --quick).
#   Full run: about 26 min on 2 cores (about 40 min on one core at one thread, estimated from stage times; 408 images a row); --quick: about 10 min on 2 cores. Re-running OUT skips finished stages
#   (--fresh redoes them); --rebuild_teacher retrains the teacher too (about 2.5 h more on one core).
# Environment: OMP_NUM_THREADS (threads per stage; default: all cores, at most 4).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
OUT=""
if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT="$1"; shift; fi
case " $* " in *" --quick "*) DEFAULT_OUT="$ROOT/outputs/toy_benchmark_quick" ;; *) DEFAULT_OUT="$ROOT/outputs/toy_benchmark" ;; esac
OUT="${OUT:-$DEFAULT_OUT}"
CORES="$(nproc 2>/dev/null || echo 1)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES < 4 ? CORES : 4 ))}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# No cd (relative OUT and flags stay relative to the caller's directory): the repo goes on PYTHONPATH.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m evaluation.shapes.benchmark --output_dir "$OUT" "$@"
