#!/usr/bin/env bash
# Shared launcher for the training scripts: single-node defaults, GPU count from the machine,
# DeepSpeed on GPUs, plain accelerate (gloo) on CPU. Usage: _launch.sh ENTRY.py [flags...]
# ENTRY is a file of the repo root. The working directory is left alone, so relative paths in the
# flags (--output_dir, --rescaled_checkpoint_path, --data_dir, ...) mean what they mean in the caller's shell.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
ENTRY="$1"; shift
NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ "$NGPU" -eq 0 ]; then
  # CPU runs: DeepSpeed needs DS_ACCELERATOR=cpu; plain accelerate needs ACCELERATE_USE_CPU=true for gloo DDP
  # (which would silently switch DeepSpeed off, so only without --ds_file).
  export DS_ACCELERATOR=cpu
  case " $* " in *" --ds_file "*) ;; *) export ACCELERATE_USE_CPU=true ;; esac
fi
NPROC="${NPROC_PER_NODE:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 1)}"
# Cluster convention of the original scripts: WORLD_SIZE = number of nodes, RANK = node rank.
NNODES="${WORLD_SIZE:-1}"; NODE_RANK="${RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"; MASTER_PORT="${MASTER_PORT:-29500}"
unset WORLD_SIZE RANK LOCAL_RANK
# Preemption (README "Long runs"): torchrun forwards these signals to every rank, which finishes its step,
# saves and exits 0; it SIGKILLs ranks still running SHUTDOWN_TIMEOUT s later (torchrun's default: 30 s,
# shorter than a full save at scale). SIGUSR1 is added so that an early "save and stop" reaches the ranks.
SIGNALS="${SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"; SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-600}"
echo "[launch] $ENTRY on $NNODES node(s) x $NPROC process(es) (GPUs seen: $NGPU), master $MASTER_ADDR:$MASTER_PORT" >&2
exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --signals_to_handle="$SIGNALS" --shutdown_timeout="$SHUTDOWN_TIMEOUT" "$ROOT/$ENTRY" "$@"
