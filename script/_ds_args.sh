# Sourced by the training scripts: DeepSpeed config by default on GPUs (BATCH_SIZE must be set).
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
ngpu="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
default_ds="$ROOT/parallel_config/deepspeed_bf16_batch${BATCH_SIZE}.json"
[ -f "$default_ds" ] || default_ds="$ROOT/parallel_config/deepspeed_bf16_batch8.json"  # micro-batch is set from the flag
DS_FILE="${DS_FILE:-$([ "$ngpu" -gt 0 ] && echo "$default_ds" || echo none)}"
DS_ARGS=()
if [ "$DS_FILE" != "none" ]; then DS_ARGS=(--ds_file "$DS_FILE"); fi
