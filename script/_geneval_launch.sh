#!/usr/bin/env bash
# Shared by the GenEval scripts (sourced). geneval_launch LABEL ENTRY NFE CFG OUTPUT_DIR [flags...]
# runs ENTRY under torchrun on this node, one process per GPU (1 without GPUs; NPROC_PER_NODE
# overrides), with GenEval's sampling settings. Reads ROOT, MODEL_NAME, RESOLUTION and PYTHON.
# geneval_positionals N DEFAULT_NFE DEFAULT_CFG ARGS...: the optional NFE and CFG positionals after the
# N required ones. A `--flag` ends them, so `geneval_sCM.sh RUN STEP --max_prompts 2` keeps the defaults.
# Sets NFE, CFG and POSITIONALS (how many arguments to shift); exits with one line on a non-number.
geneval_positionals() {
  local required="$1"; NFE="$2"; CFG="$3"; shift 3; shift "$required"
  POSITIONALS="$required"
  if [ "$#" -gt 0 ] && [ "${1#--}" = "$1" ]; then
    NFE="$1"; POSITIONALS=$((POSITIONALS + 1)); shift
    if [ "$#" -gt 0 ] && [ "${1#--}" = "$1" ]; then CFG="$1"; POSITIONALS=$((POSITIONALS + 1)); fi
  fi
  if ! [[ "$NFE" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NFE (argument $((required + 1))) must be a positive integer, got '$NFE'; flags go after NFE and CFG" >&2; exit 2
  fi
  if ! [[ "$CFG" =~ ^-?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][-+]?[0-9]+)?$ ]]; then
    echo "error: CFG (argument $((required + 2))) must be a number, got '$CFG'; flags go after NFE and CFG" >&2; exit 2
  fi
}

geneval_launch() {
  local label="$1" entry="$2" nfe="$3" cfg="$4" output_dir="$5"; shift 5
  local python ngpu nproc
  python="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
  ngpu="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  nproc="${NPROC_PER_NODE:-$([ "$ngpu" -gt 0 ] && echo "$ngpu" || echo 1)}"
  echo "[geneval] $label, NFE $nfe, guidance $cfg, ${RESOLUTION}px, $nproc process(es) -> $output_dir" >&2
  # No cd: relative paths (OUTPUT_DIR, --resume_path, ...) stay relative to the caller's working directory.
  exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$ROOT/$entry" \
    --pretrained_model_name_or_path "$MODEL_NAME" --max_sequence_length 256 --seed 42 --resolution "$RESOLUTION" \
    --num_inference_steps "$nfe" --guidance_scale "$cfg" --output_dir "$output_dir" "$@"
}
