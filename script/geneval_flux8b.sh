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
source "$ROOT/script/_geneval_launch.sh"
geneval_positionals 1 28 3.5 "$@"
shift "$POSITIONALS"
MODEL_NAME="${MODEL_NAME:-Freepik/flux.1-lite-8B}"; RESOLUTION="${RESOLUTION:-512}"
OUTPUT_DIR="${OUTPUT_DIR:-$OUTPUT_PATH/GenEval_RESOLUTION${RESOLUTION}_NFE${NFE}_cfg${CFG}/images}"
geneval_launch "teacher $MODEL_NAME" test_flux8b.py "$NFE" "$CFG" "$OUTPUT_DIR" "$@"
