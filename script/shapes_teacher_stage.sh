#!/usr/bin/env bash
# One resumable stage (MINUTES of work) of the shapes-world teacher build (issue #12; see
# docs/toy_benchmark/teacher_diagnosis.md). Re-run the same line until it prints "built teacher".
#   [RECIPE=vN] bash script/shapes_teacher_stage.sh [MINUTES] [THREADS]
# RECIPE (default: the committed teacher's, COMMITTED_RECIPE in evaluation/shapes/teacher_build/recipes.py)
# names the build recipe; STATE (default outputs/shapes_teacher_${RECIPE}_state) holds the resumable state
# (text-encoder pretraining, then flow matching, then guidance distillation); OUT (default
# outputs/shapes_teacher_${RECIPE}) the result.
# Keep THREADS fixed across stages: a build is bitwise reproducible for a fixed thread count (use 1 on a
# shared machine: 2 threads under load were ~100x slower).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIN="${1:-75}"; THREADS="${2:-1}"
RECIPE="${RECIPE:-$(cd "$ROOT" && .venv/bin/python -c \
  'from evaluation.shapes.teacher_build.recipes import COMMITTED_RECIPE; print(COMMITTED_RECIPE)')}"
STATE="$(realpath -m "${STATE:-outputs/shapes_teacher_${RECIPE}_state}")"
OUT="$(realpath -m "${OUT:-outputs/shapes_teacher_${RECIPE}}")"
cd "$ROOT"
OMP_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python -m evaluation.shapes.teacher --recipe "$RECIPE" \
  --output_dir "$OUT" --state_dir "$STATE" --reuse_vae_from assets/shapes_teacher \
  --threads "$THREADS" --max_minutes "$MIN" --no_progress
