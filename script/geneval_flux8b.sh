#!/usr/bin/env bash
# GenEval images of the FLUX teacher with diffusers' FluxPipeline (the original release's script):
#   bash script/geneval_flux8b.sh OUTPUT_PATH [NFE] [CFG] [extra test_flux8b.py flags...]
#   e.g. bash script/geneval_flux8b.sh work_dirs/flux8b_geneval 28 3.5
# Writes ${OUTPUT_PATH}/GenEval_RESOLUTION<R>_NFE<NFE>_cfg<CFG>/images (or ${OUTPUT_DIR} when set).
# NFE defaults to 28, CFG (the distilled guidance) to 3.5. A rescaled teacher: add
# `--resume_path rescaled.pt` (its timestep_scale comes from the file; 1 for original-format files).
# Environment: MODEL_NAME (default Freepik/flux.1-lite-8B), RESOLUTION (512), OUTPUT_DIR,
# NPROC_PER_NODE (default: number of GPUs, 1 without GPUs), PYTHON. Rerunning resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTPUT_PATH=${1:?OUTPUT_PATH (1st argument) is required}
NFE=${2:-28}; CFG=${3:-3.5}
shift $(( $# < 3 ? $# : 3 ))
MODEL_NAME="${MODEL_NAME:-Freepik/flux.1-lite-8B}"; RESOLUTION="${RESOLUTION:-512}"
OUTPUT_DIR="${OUTPUT_DIR:-$OUTPUT_PATH/GenEval_RESOLUTION${RESOLUTION}_NFE${NFE}_cfg${CFG}/images}"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
NPROC="${NPROC_PER_NODE:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 1)}"
echo "[geneval] teacher $MODEL_NAME, NFE $NFE, guidance $CFG, ${RESOLUTION}px, $NPROC process(es) -> $OUTPUT_DIR" >&2
cd "$ROOT"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" test_flux8b.py \
  --pretrained_model_name_or_path "$MODEL_NAME" --max_sequence_length 256 --seed 42 --resolution "$RESOLUTION" \
  --num_inference_steps "$NFE" --guidance_scale "$CFG" --output_dir "$OUTPUT_DIR" "$@"
