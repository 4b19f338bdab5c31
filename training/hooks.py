"""The loop's named pieces ("hooks"): everything a run does besides the optimizer step itself.

A hook subclasses :class:`Hook` and overrides what it needs; :func:`training.core.train` calls, on
every rank, in list order:

    on_train_start(run)           once, after the models are prepared and a checkpoint is restored
    on_update(run, update)        after every *applied* optimizer update (skipped steps never reach hooks)
    on_save(run, step)            inside every checkpoint save, main process only, before the checkpoint
                                  is published — write extra exports beside ``ckpts/transformer_<step>.pt``
    on_train_end(run)             once, also after an error (close files, progress bars)

State that must survive a resume goes in ``state_dict()`` (return ``None`` when there is none): the
states of all hooks are written, keyed by ``Hook.name``, into ``checkpoint-<step>/hook_states.pt`` and
given back to ``load_state_dict`` on resume.  A hook must not touch the global RNG (the loss noise
comes from it; resume and "with/without this hook" runs must stay bit-identical) and must do the same
collectives on every rank.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from training import checkpointing as ckpt
from training.common import LossOutput

if TYPE_CHECKING:
    from training.core import Run

logger = logging.getLogger("t2i_distill")


@dataclass
class Update:
    """One applied optimizer update, as hooks see it."""

    step: int  # applied updates so far, this one included
    loss: LossOutput  # of the last micro-batch of the accumulation window
    grad_norm: float | None  # before clipping; None when the backend does not report it
    lr: float  # the scheduler's learning rate after this update (the next update's)
    seconds: float  # wall time of the window's last micro-batch
    samples_per_s: float = 0.0  # samples read by all ranks over the window's wall time


class Hook:
    name: str = ""  # key of this hook's state in hook_states.pt; unique per run

    def on_train_start(self, run: "Run") -> None:
        pass

    def on_update(self, run: "Run", update: Update) -> None:
        pass

    def on_save(self, run: "Run", step: int) -> None:
        pass

    def on_train_end(self, run: "Run") -> None:
        pass

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class RunLog:
    """Main-process JSON-lines logs: ``logs/metrics.jsonl`` (one line per logged step) and
    ``logs/events.jsonl`` (bad samples, skipped steps, stops, saves)."""

    def __init__(self, output_dir: str, enabled: bool):
        self.metrics = Path(output_dir, "logs", "metrics.jsonl")
        self.events = Path(output_dir, "logs", "events.jsonl")
        self.enabled = enabled

    def _append(self, path: Path, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:  # e.g. a full disk: the next checkpoint save reports it clearly and stops
            logger.warning("could not append to %s: %s", path, exc)

    def metric(self, record: dict) -> None:
        self._append(self.metrics, record)

    def event(self, kind: str, **record) -> None:
        self._append(self.events, {"event": kind, "time": round(time.time(), 3), **record})

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop metric lines of steps after the checkpoint (they are recomputed)."""
        if not (self.enabled and self.metrics.exists()):
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill -9
            if record.get("step", 0) <= step:
                kept.append(line)
        ckpt.atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))


class MetricsLogger(Hook):
    """Every ``logging_steps`` updates: the loss's logs (every loss term, tangent norm, adaptive weights)
    + lr, grad norm, timing, samples/s, bad-sample and skipped-step counters → metrics.jsonl and trackers."""

    name = "metrics"

    def __init__(self, every: int):
        self.every = every

    def on_update(self, run: "Run", update: Update) -> None:
        if update.step % self.every:
            return
        logs = {**update.loss.logs, "lr": update.lr, "step_time": update.seconds,
                "samples_per_s": update.samples_per_s, "bad_samples": run.state.bad_samples,
                "skipped_nonfinite": run.state.skipped_nonfinite}
        if update.grad_norm is not None:
            logs["grad_norm"] = update.grad_norm
        run.accelerator.log(logs, step=update.step)
        run.log.metric({"step": update.step, **logs})


class ProgressBar(Hook):
    """tqdm bar of applied updates on the local main process, with the last loss."""

    name = "progress"

    def on_train_start(self, run: "Run") -> None:
        self.bar = tqdm(total=run.args.max_train_steps, initial=run.state.step, desc=f"{run.method.name} steps",
                        disable=not run.accelerator.is_local_main_process, dynamic_ncols=True)

    def on_update(self, run: "Run", update: Update) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{update.loss.loss.item():.4f}", refresh=False)

    def on_train_end(self, run: "Run") -> None:
        if hasattr(self, "bar"):
            self.bar.close()
