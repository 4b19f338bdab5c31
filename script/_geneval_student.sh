#!/usr/bin/env bash
# Shared body of geneval_sCM.sh / geneval_meanflow.sh (sourced after they set METHOD, ENTRY,
# DEFAULT_NFE and DEFAULT_CFG). Arguments: CKPT_PATH CKPT_ITER [NFE] [CFG] [extra flags...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CKPT_PATH=${1:?CKPT_PATH (1st argument, the training output folder holding ckpts/) is required}
CKPT_ITER=${2:?CKPT_ITER (2nd argument, the step of ckpts/transformer_<step>.pt or ckpts/lora_<step>/) is required}
if ! [[ "$CKPT_ITER" =~ ^[0-9]+$ ]]; then
  echo "error: CKPT_ITER (2nd argument) must be the step number of ckpts/transformer_<step>.pt, got '$CKPT_ITER'" >&2; exit 2
fi
source "$ROOT/script/_geneval_launch.sh"
geneval_positionals 2 "$DEFAULT_NFE" "$DEFAULT_CFG" "$@"
shift "$POSITIONALS"
MODEL_NAME="${MODEL_NAME:-Freepik/flux.1-lite-8B}"; RESOLUTION="${RESOLUTION:-512}"
EMA=""; case " $* " in *" --use_ema "*) EMA="_ema" ;; esac  # EMA samples get their own folder
OUTPUT_DIR="${OUTPUT_DIR:-$CKPT_PATH/GenEval/GenEval_RESOLUTION${RESOLUTION}_NFE${NFE}_cfg${CFG}/images/global_steps${CKPT_ITER}${EMA}}"
# A LoRA run (--lora_rank) exports the folder ckpts/lora_<step>/ instead of transformer_<step>.pt.
RESUME="$CKPT_PATH/ckpts/transformer_${CKPT_ITER}.pt"
if [[ ! -e "$RESUME" && -d "$CKPT_PATH/ckpts/lora_${CKPT_ITER}" ]]; then RESUME="$CKPT_PATH/ckpts/lora_${CKPT_ITER}"; fi
geneval_launch "$METHOD step $CKPT_ITER" "$ENTRY" "$NFE" "$CFG" "$OUTPUT_DIR" --resume_path "$RESUME" "$@"
