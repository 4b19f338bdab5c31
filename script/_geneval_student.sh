#!/usr/bin/env bash
# Shared body of geneval_sCM.sh / geneval_meanflow.sh (sourced after they set METHOD, ENTRY,
# DEFAULT_NFE and DEFAULT_CFG). Arguments: CKPT_PATH CKPT_ITER [NFE] [CFG] [extra flags...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT_PATH=${1:?CKPT_PATH (1st argument, the training output folder holding ckpts/) is required}
CKPT_ITER=${2:?CKPT_ITER (2nd argument, the step of ckpts/transformer_<step>.pt) is required}
NFE=${3:-$DEFAULT_NFE}; CFG=${4:-$DEFAULT_CFG}
shift $(( $# < 4 ? $# : 4 ))
MODEL_NAME="${MODEL_NAME:-Freepik/flux.1-lite-8B}"; RESOLUTION="${RESOLUTION:-512}"
OUTPUT_DIR="${OUTPUT_DIR:-$CKPT_PATH/GenEval/GenEval_RESOLUTION${RESOLUTION}_NFE${NFE}_cfg${CFG}/images/global_steps${CKPT_ITER}}"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
NPROC="${NPROC_PER_NODE:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 1)}"
echo "[geneval] $METHOD step $CKPT_ITER, NFE $NFE, guidance $CFG, ${RESOLUTION}px, $NPROC process(es) -> $OUTPUT_DIR" >&2
cd "$ROOT"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$ENTRY" \
  --pretrained_model_name_or_path "$MODEL_NAME" --resume_path "$CKPT_PATH/ckpts/transformer_${CKPT_ITER}.pt" \
  --max_sequence_length 256 --seed 42 --resolution "$RESOLUTION" --num_inference_steps "$NFE" \
  --guidance_scale "$CFG" --output_dir "$OUTPUT_DIR" "$@"
