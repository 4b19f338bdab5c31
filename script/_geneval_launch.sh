#!/usr/bin/env bash
# Shared by the GenEval scripts (sourced). geneval_launch LABEL ENTRY NFE CFG OUTPUT_DIR [flags...]
# runs ENTRY under torchrun on this node, one process per GPU (1 without GPUs; NPROC_PER_NODE
# overrides), with GenEval's sampling settings. Reads ROOT, MODEL_NAME, RESOLUTION and PYTHON.
geneval_launch() {
  local label="$1" entry="$2" nfe="$3" cfg="$4" output_dir="$5"; shift 5
  local python ngpu nproc
  python="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
  ngpu="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
  nproc="${NPROC_PER_NODE:-$([ "$ngpu" -gt 0 ] && echo "$ngpu" || echo 1)}"
  echo "[geneval] $label, NFE $nfe, guidance $cfg, ${RESOLUTION}px, $nproc process(es) -> $output_dir" >&2
  cd "$ROOT"
  exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$entry" \
    --pretrained_model_name_or_path "$MODEL_NAME" --max_sequence_length 256 --seed 42 --resolution "$RESOLUTION" \
    --num_inference_steps "$nfe" --guidance_scale "$cfg" --output_dir "$output_dir" "$@"
}
