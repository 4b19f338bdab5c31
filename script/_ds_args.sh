# Sourced by the training scripts: DeepSpeed config by default on GPUs (BATCH_SIZE must be set).
# The committed configs differ only in the micro-batch, which the trainer always overwrites from
# --train_batch_size; a batch size without its own file uses batch8's settings and says so.
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
ngpu="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ -z "${DS_FILE:-}" ]; then
  if [ "$ngpu" -gt 0 ]; then
    DS_FILE="$ROOT/parallel_config/deepspeed_bf16_batch${BATCH_SIZE}.json"
    if [ ! -f "$DS_FILE" ]; then
      DS_FILE="$ROOT/parallel_config/deepspeed_bf16_batch8.json"
      echo "[launch] note: no parallel_config/deepspeed_bf16_batch${BATCH_SIZE}.json; using deepspeed_bf16_batch8.json" \
           "(same ZeRO-2 bf16 settings; micro-batch ${BATCH_SIZE} comes from --train_batch_size). Set DS_FILE to choose." >&2
    fi
  else
    DS_FILE=none
  fi
fi
DS_ARGS=()
if [ "$DS_FILE" != "none" ]; then DS_ARGS=(--ds_file "$DS_FILE"); fi
