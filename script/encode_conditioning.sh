#!/usr/bin/env bash
# Encode a dataset once into a conditioning cache (T5 + CLIP embeddings, VAE latents; data/conditioning_cache.py),
# one process per GPU, shards split over the ranks; re-running completes an interrupted cache.
# Usage: bash script/encode_conditioning.sh OUT RESOLUTION [flags of python -m data.encode_conditioning]
#   e.g. bash script/encode_conditioning.sh work_dirs/cond512 512 --dataset_name my/dataset --max_sequence_length 256
# Then: bash script/train_sCM.sh ... --conditioning_cache work_dirs/cond512   (same resolution and T5 length)
# MODEL_NAME selects the pipeline (default Freepik/flux.1-lite-8B); NPROC_PER_NODE overrides the GPU count.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: bash script/encode_conditioning.sh OUT RESOLUTION [flags]" >&2
  exit 2
fi
OUT="$1"; RESOLUTION="$2"; shift 2
case "$RESOLUTION" in (*[!0-9]*|'') echo "error: RESOLUTION must be a number of pixels, got '$RESOLUTION'" >&2; exit 2;; esac
PY="${PYTHON:-$ROOT/.venv/bin/python}"
NPROC="${NPROC_PER_NODE:-$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
# The working directory is left alone: relative paths in the flags resolve against the caller's.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m data.encode_conditioning \
  --pretrained_model_name_or_path "${MODEL_NAME:-Freepik/flux.1-lite-8B}" --output_dir "$OUT" \
  --resolution "$RESOLUTION" "$@"
