"""Entry-point wrapper: user errors become one clear line on stderr and exit code 2."""
from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import sys
import threading
from typing import Callable, NoReturn

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


def exit_process(code: int) -> NoReturn:
    """End a training process with ``code``: ``sys.exit``, minus interpreter finalisation after a
    distributed run.

    Why (from the core dump of a finished 2-process run that ended in "terminate called without an
    active exception", SIGABRT): gloo's worker threads outlive ``destroy_process_group`` (the DDP
    reducer still owns the process group) and drop their reference to a completed all-reduce
    asynchronously.  When that is the last reference to a Python tensor, the thread must take the GIL
    to release it; a non-main thread that takes the GIL while the interpreter finalises is ended by
    ``pthread_exit``, whose forced unwind through gloo's ``noexcept`` work destructor calls
    ``std::terminate``.  Rare, and more likely on a loaded machine.  So, once torch.distributed has run,
    the ordinary shutdown is done by hand — wait for non-daemon threads, run the ``atexit`` handlers
    (logging, multiprocessing, trackers), flush stdio — and the process ends with ``os._exit``.
    """
    dist = sys.modules.get("torch.distributed")
    distributed = dist is not None and (("LOCAL_RANK" in os.environ) or (dist.is_available() and dist.is_initialized()))
    if not distributed:
        sys.exit(code)
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stream: nothing left to lose
    os._exit(code)
