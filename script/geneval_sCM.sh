#!/usr/bin/env bash
# GenEval images of an sCM student (the original release's script, made launchable anywhere):
#   bash script/geneval_sCM.sh CKPT_PATH CKPT_ITER [NFE] [CFG] [extra test_sCM.py flags...]
#   e.g. bash script/geneval_sCM.sh work_dirs/sCM 10000 2 4.5
# Samples ${CKPT_PATH}/ckpts/transformer_${CKPT_ITER}.pt, or a LoRA run's ckpts/lora_${CKPT_ITER}/ (CKPT_PATH = the
# training --output_dir) into
#   ${OUTPUT_DIR:-${CKPT_PATH}/GenEval/GenEval_RESOLUTION<R>_NFE<NFE>_cfg<CFG>/images/global_steps<CKPT_ITER>}
# Extra flag --use_ema samples transformer_<CKPT_ITER>_ema.pt (LoRA: lora_<CKPT_ITER>_ema/) instead (into
# .../global_steps<CKPT_ITER>_ema).
# NFE defaults to 2 (intermediate time 1.3), CFG (the distilled guidance) to 4.5.
# Environment: MODEL_NAME (default Freepik/flux.1-lite-8B), RESOLUTION (512), OUTPUT_DIR,
# NPROC_PER_NODE (default: number of GPUs, 1 without GPUs), PYTHON. Rerunning resumes: finished
# prompts are skipped, and every image depends only on (seed, prompt, sample) whatever NPROC_PER_NODE is.
set -euo pipefail
METHOD=sCM ENTRY=test_sCM.py DEFAULT_NFE=2 DEFAULT_CFG=4.5
source "$(dirname "${BASH_SOURCE[0]}")/_geneval_student.sh"
