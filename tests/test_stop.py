"""training/stop.py on its own: the stop request's handler and DataLoader workers under stop signals."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from training import stop as stop_module
from training.stop import StopRequest, ignore_stop_signals, start_iterator


def test_stop_request_records_the_first_signal_and_forces_only_on_a_later_sigint(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(stop_module.time, "monotonic", lambda: clock[0])
    before = {sig: signal.getsignal(sig) for sig in stop_module.STOP_SIGNALS}
    request = StopRequest()
    request.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.requested and request.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a copy: still just a stop, the first name stays
        clock[0] += 1.0
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's forwarded copy, 1 s later: no interrupt
        assert request.signal_name == "SIGUSR1"
        clock[0] += stop_module.FORCE_INTERRUPT_AFTER_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again, later: stop now
    finally:
        request.restore()
    assert {sig: signal.getsignal(sig) for sig in stop_module.STOP_SIGNALS} == before


class _Pids(Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> tuple[int, int]:
        time.sleep(0.02)
        return index, os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split()[2] != "Z"


def test_dataloader_workers_survive_stop_signals_from_others_and_end_with_their_iterator():
    """SIGTERM/SIGINT/SIGUSR1 from a process other than the rank (here: sent as if by the launcher) leave the
    workers running — without the worker_init_fn the rank raises 'DataLoader worker ... killed by signal';
    the rank's own shutdown of the iterator still ends them."""
    loader = DataLoader(_Pids(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(0))
    iterator = start_iterator(loader)
    indices, workers = [], set()
    for i, (index, pid) in enumerate(iterator):
        indices += index.tolist()
        workers |= set(pid.tolist())
        if i == 3:
            assert len(workers) == 2
            for worker in workers:  # from a child of the rank (not the worker's parent), like torchrun's killpg
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                    if os.fork() == 0:
                        os.kill(worker, sig)
                        os._exit(0)
                    os.wait()
        if i == 12:  # well after the signals: both workers still alive and serving
            assert all(_alive(pid) for pid in workers)
    assert sorted(indices) == list(range(40))  # every batch arrived: no worker died
    del iterator  # exhausted: the rank shut its workers down (SIGTERM from their parent if one lingers)
    deadline = time.time() + 30
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)
