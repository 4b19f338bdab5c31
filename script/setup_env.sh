#!/usr/bin/env bash
# Idempotent environment set-up: a .venv at the repo root with the pinned requirements.
# Re-running is a no-op unless requirements.txt changed. Source it or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  echo "[setup] environment up to date: $VENV" >&2
else
  PY="${PYTHON:-python3}"
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "[setup] need Python >= 3.10" >&2; exit 1; }
  echo "[setup] installing pinned requirements into $VENV (first time: a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt" >&2
  echo "$want" > "$STAMP"
fi
