"""Entry-point wrapper: user errors become one clear line on stderr and exit code 2."""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from typing import Callable

from training.common import TrainingError

# Errors that mean "the input is wrong", as opposed to bugs (which keep their traceback).
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, TrainingError)
# OSErrors that mean "the disk cannot take the output": the user must free space or choose another folder.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


def disk_errno(exc: BaseException) -> int | None:
    """The errno of a refused write: an OSError's, or the "(os error N)" that safetensors' Rust writer reports."""
    if isinstance(exc, OSError):
        return exc.errno
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return int(match.group(1)) if match else None


def disk_error_message(exc: BaseException) -> str:
    """One line for a write that the disk refused: what, where, how much space is left, what to do."""
    code = disk_errno(exc)
    where = getattr(exc, "filename", None)
    reason = os.strerror(code) if code is not None else str(exc)
    free = ""
    if where:
        try:
            free = f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(where))).free / 2**20:.1f} MiB free there"
        except OSError:
            pass
    return (f"could not write {where or 'the output'} ({reason}{free}). Free disk space or choose a writable output "
            "folder, then rerun the same command (finished files are kept; partial ones were removed).")


def run_cli(main: Callable[[], object]) -> int:
    """Run ``main``; its int return value (if any) is the exit status, user errors give status 2."""
    try:
        result = main()
    except USER_ERRORS as exc:
        if os.environ.get("T2I_DISTILL_DEBUG"):
            raise
        print(f"error: {exc}\n(set T2I_DISTILL_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - only refused writes are reported as one line; the rest re-raise
        if disk_errno(exc) not in DISK_ERRNOS or os.environ.get("T2I_DISTILL_DEBUG"):
            raise
        print(f"error: {disk_error_message(exc)}\n(set T2I_DISTILL_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
