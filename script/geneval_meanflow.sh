#!/usr/bin/env bash
# GenEval images of a MeanFlow student (the original release's script, made launchable anywhere):
#   bash script/geneval_meanflow.sh CKPT_PATH CKPT_ITER [NFE] [CFG] [extra test_meanflow.py flags...]
#   e.g. bash script/geneval_meanflow.sh work_dirs/meanflow 10000 4 3.5
# Samples ${CKPT_PATH}/ckpts/transformer_${CKPT_ITER}.pt, or a LoRA run's ckpts/lora_${CKPT_ITER}/ (CKPT_PATH = the
# training --output_dir) into
#   ${OUTPUT_DIR:-${CKPT_PATH}/GenEval/GenEval_RESOLUTION<R>_NFE<NFE>_cfg<CFG>/images/global_steps<CKPT_ITER>}
# Extra flag --use_ema samples transformer_<CKPT_ITER>_ema.pt (LoRA: lora_<CKPT_ITER>_ema/) instead (into
# .../global_steps<CKPT_ITER>_ema).
# NFE defaults to 4 (FLUX-shifted time grid), CFG (the distilled guidance) to 3.5.
# Environment: MODEL_NAME (default Freepik/flux.1-lite-8B), RESOLUTION (512), OUTPUT_DIR,
# NPROC_PER_NODE (default: number of GPUs, 1 without GPUs), PYTHON. Rerunning resumes: finished
# prompts are skipped, and every image depends only on (seed, prompt, sample) whatever NPROC_PER_NODE is.
set -euo pipefail
METHOD=MeanFlow ENTRY=test_meanflow.py DEFAULT_NFE=4 DEFAULT_CFG=3.5
source "$(dirname "${BASH_SOURCE[0]}")/_geneval_student.sh"
