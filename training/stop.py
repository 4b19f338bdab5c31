"""Stop requests: SIGTERM/SIGINT/SIGUSR1 → finish the current optimizer step, checkpoint, exit 0 —
whoever receives the signal.

Schedulers (SLURM ``scancel``/preemption/``--signal``, Kubernetes) and a terminal's Ctrl-C signal the
*whole process group*, or every process of the job: the launcher, every rank and every DataLoader worker.
The outcome must not depend on which of them gets the signal first:

* a rank's :class:`StopRequest` turns SIGTERM, SIGINT and SIGUSR1 into a flag; the training loop only
  reads :attr:`StopRequest.requested`, all-reduced with the step's other decisions, so every rank
  finishes the same step, saves the same checkpoint and exits 0 (and :attr:`StopRequest.signal_name`
  for the message);
* DataLoader workers ignore them (:func:`ignore_stop_signals`, their ``worker_init_fn``).  Left
  alone, a worker dies of a SIGTERM that does not come from its own rank (torch's worker handler only
  exits quietly for its parent's) and the rank then raises "DataLoader worker ... exited unexpectedly"
  or "... killed by signal" from wherever it happens to be.  Workers are forked with the stop signals
  blocked (:func:`start_iterator`) and unblock them only once they ignore them, so no signal lands in
  between; a worker still ends when its rank shuts the iterator down, exits, or dies (torch's worker
  watchdog).

A SIGINT coming :data:`FORCE_INTERRUPT_AFTER_S` seconds or more after the first stop signal raises
``KeyboardInterrupt`` (Ctrl-C twice: stop now, without saving).  Copies of one stop that arrive closer
together — the direct signal plus the one the launcher forwards, a whole-group Ctrl-C — only stop.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from torch.utils.data import DataLoader

# SIGUSR1 is the signal to pick for an early "save and stop" (e.g. SLURM ``--signal=USR1@300``): unlike
# SIGTERM it is sent by nothing else, so a scheduler's own SIGTERM/SIGKILL sequence stays distinct.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
FORCE_INTERRUPT_AFTER_S = 2.0


class StopRequest:
    """SIGTERM/SIGINT/SIGUSR1 → finish the current optimizer step, checkpoint, exit 0.

    The handler only records the signal (it may run between any two bytecodes, so it must not log or
    take locks).  Previous handlers are restored by :meth:`restore`, so calling ``train`` in-process
    leaves the caller's handlers intact.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.requested:
            if signum == signal.SIGINT and now - self._first_at >= FORCE_INTERRUPT_AFTER_S:
                raise KeyboardInterrupt
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self._first_at = now


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores the stop signals; its rank decides.

    SIGINT and SIGUSR1 are ignored.  SIGTERM stays blocked (as :func:`start_iterator` forked the
    worker) and a thread takes it with ``sigwaitinfo``: from the worker's own rank — torch's iterator
    shutdown, or multiprocessing's at interpreter exit — it ends the worker as torch's own handler does
    (``_exit(0)``); from anyone else (the launcher, a scheduler, ``kill -- -PGID``) it is dropped.
    Plain ``SIG_IGN`` would make a worker that outlives its iterator block its rank's exit for ever.
    """
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM,))
    threading.Thread(target=_take_sigterm, args=(os.getppid(),), name="sigterm-from-rank", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [s for s in STOP_SIGNALS if s != signal.SIGTERM])


def _take_sigterm(rank_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo((signal.SIGTERM,))
        if info.si_pid == rank_pid:
            os._exit(0)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold the stop signals of the calling thread (they are delivered when the block ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_iterator(loader: DataLoader):
    """``iter(loader)``, with any worker processes started while the stop signals are blocked.

    Workers inherit the blocked mask and unblock it in :func:`ignore_stop_signals`; a signal meant
    for the rank in the meantime stays pending and is handled as soon as the workers are started.
    """
    with stop_signals_blocked():
        return iter(loader)
