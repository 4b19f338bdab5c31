#!/usr/bin/env bash
# Plumbing check of the whole recipe on a *random* tiny FLUX (about 75 s on 2 cores, no downloads):
#   build a tiny FLUX pipeline + image-caption parquet dataset (data/tiny_flux.py) → rescale the
#   teacher's time input → distil with sCM → sample a few prompts with the 2-step student.
# The images are noise (random weights); script/quickstart.sh shows distillation on a trained teacher.
# Usage: bash script/smoke_tiny.sh [OUT]   (default outputs/smoke_tiny; re-running reuses what exists)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/outputs/smoke_tiny}" && cd "${1:-$ROOT/outputs/smoke_tiny}" && pwd)"
bash "$ROOT/script/setup_env.sh"
PY="$ROOT/.venv/bin/python"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MODEL_NAME="$OUT/tiny-flux" NUM_WORKERS=0
cd "$ROOT"
step() { printf '\n\033[1m[smoke_tiny] %s\033[0m\n' "$*" >&2; }

step "1/4 tiny FLUX pipeline + dataset"
"$PY" -m data.tiny_flux --output_dir "$OUT"

step "2/4 rescale the teacher's time input (x1000 -> x1) by self-distillation"
bash script/rescale_teacher.sh 1e-3 64 4 "$OUT/rescale" \
  --data_dir "$OUT/tiny-data" --max_train_steps 30 --checkpointing_steps 30 --report_to none

step "3/4 sCM distillation of the rescaled teacher"
bash script/train_sCM.sh 1e-4 64 4 "$OUT/sCM" "$OUT/rescale/rescaled.pt" \
  --data_dir "$OUT/tiny-data" --max_train_steps 20 --checkpointing_steps 10 --tangent_warmup_steps 10 \
  --report_to none

step "4/4 sample with the 2-step student"
CKPT="$(ls -v "$OUT"/sCM/ckpts/transformer_*.pt | tail -n 1)"
printf 'a red circle\na photo of two blue squares\na green triangle left of a yellow square\n' > "$OUT/prompts.txt"
"$PY" test_sCM.py --pretrained_model_name_or_path "$OUT/tiny-flux" --resume_path "$CKPT" \
  --prompts "$OUT/prompts.txt" --resolution 64 --num_inference_steps 2 --n_samples 2 --grid \
  --output_dir "$OUT/samples"

cat >&2 <<EOF

[smoke_tiny] done. Everything is under $OUT:
  tiny-flux/, tiny-data/           tiny random FLUX pipeline and dataset
  rescale/rescaled.pt              teacher with time inputs in [0, 1]
  sCM/ckpts/                       sCM student exports (original {'module': ...} format): $(basename "$CKPT")
  sCM/checkpoints/                 full resumable training state
  sCM/logs/metrics.jsonl           per-step losses
  samples/                         2-step samples, GenEval folder layout (+ grid.png per prompt)
The tiny models are random, so the images are noise: this run checks the plumbing end to end.
EOF
