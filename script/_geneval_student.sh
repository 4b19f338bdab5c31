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
source "$ROOT/script/_geneval_launch.sh"
geneval_launch "$METHOD step $CKPT_ITER" "$ENTRY" "$NFE" "$CFG" "$OUTPUT_DIR" \
  --resume_path "$CKPT_PATH/ckpts/transformer_${CKPT_ITER}.pt" "$@"
