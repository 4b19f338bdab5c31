#!/usr/bin/env bash
# Teacher rescaling (the recipe's first step): stock FLUX (time inputs x1000) -> time inputs in [0, 1].
#   bash script/rescale_teacher.sh LR RESOLUTION BATCH_SIZE OUT_DIR [extra train_rescale.py flags...]
#   e.g. bash script/rescale_teacher.sh 1e-5 1024 4 work_dirs/rescale
# Writes OUT_DIR/rescaled.pt and OUT_DIR/rescaled_transformer/ (pass either to script/train_sCM.sh and
# script/train_meanflow.sh as RESCALED_PATH); check it with check_rescale.py.
# Paper settings (section 2.1): self-distillation from the original model with a smooth-L1 loss, 1024x1024,
# total batch 128, 120K iterations. Total batch = nodes x GPUs x BATCH_SIZE x GRAD_ACCUM, e.g. 4 nodes x 8 GPUs
# x 4 x 1. The paper gives no learning rate: 1e-5 below is our default, not theirs.
# Environment: MODEL_NAME (default Freepik/flux.1-lite-8B), GRAD_ACCUM (default 1), MAX_STEPS (default 120000),
# DS_FILE (default parallel_config/deepspeed_bf16_batch<BATCH>.json on GPUs, none on CPU; DS_FILE=none disables),
# NPROC_PER_NODE, and for multi-node WORLD_SIZE (nodes), RANK (node rank), MASTER_ADDR, MASTER_PORT.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LR=${1:-1e-5}; RESOLUTION=${2:-1024}; BATCH_SIZE=${3:-4}; OUT_DIR=${4:?OUT_DIR (4th argument) is required}
shift $(( $# < 4 ? $# : 4 ))
MODEL_NAME="${MODEL_NAME:-Freepik/flux.1-lite-8B}"
source "$ROOT/script/_ds_args.sh"
exec bash "$ROOT/script/_launch.sh" train_rescale.py \
  --pretrained_model_name_or_path "$MODEL_NAME" --objective self_distill --loss smooth_l1 \
  --resolution "$RESOLUTION" --dataloader_num_workers "${NUM_WORKERS:-4}" --output_dir "$OUT_DIR" \
  --train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "${GRAD_ACCUM:-1}" "${DS_ARGS[@]}" \
  --max_train_steps "${MAX_STEPS:-120000}" --max_grad_norm 1.0 --gradient_checkpointing --learning_rate "$LR" \
  --checkpointing_steps 2000 --checkpoints_total_limit 3 --allow_tf32 --report_to tensorboard \
  --resume_from_checkpoint latest "$@"
