"""Stop requests: SIGTERM/SIGINT → finish the current optimizer step, checkpoint, exit 0.

The training loop only reads :attr:`StopRequest.requested` (all-reduced with the other per-micro-batch
flags, so every rank stops at the same step) and :attr:`StopRequest.signal_name` (for the message).
"""
from __future__ import annotations

import signal
import threading


class StopRequest:
    """A second SIGINT (Ctrl-C twice) interrupts at once, as users expect; SIGTERM only ever sets the
    flag (schedulers send SIGKILL after their grace period anyway).  Previous handlers are restored
    by :meth:`restore`, so calling ``train`` in-process leaves the caller's handlers intact.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
