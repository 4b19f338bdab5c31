"""The resumable optimisation loop every trained stage of the teacher build runs (text pretraining, flow
matching, guidance distillation): AdamW + EMA, checkpointed so a stopped stage continues bit-identically."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from evaluation.shapes.teacher_build.common import progress_bar
from evaluation.shapes.teacher_build.recipes import TeacherConfig


@dataclass
class Budget:
    """When a resumable stage stops early (None: never): wall-clock minutes or optimizer steps of this run."""

    max_minutes: Optional[float] = None
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        self._start = time.monotonic()
        self._steps = 0

    def spend(self) -> bool:
        """Count one step; True when the budget is used up."""
        self._steps += 1
        if self.max_steps is not None and self._steps >= self.max_steps:
            return True
        return self.max_minutes is not None and time.monotonic() - self._start >= 60 * self.max_minutes


@dataclass
class StageResult:
    """Outcome of a resumable optimisation stage: EMA weights per module (None when paused)."""

    step: int
    total: int
    history: list
    ema: Optional[dict] = None

    @property
    def done(self) -> bool:
        return self.step >= self.total


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` under a temporary name, then renamed: a killed save never leaves a torn checkpoint."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Loop:
    """The state of one :func:`optimise` run: parameters, their EMA, the optimizer and the generator."""

    def __init__(self, modules: dict, lr0: float, generator, config: TeacherConfig, checkpoint: Optional[Path]):
        import torch

        self.modules, self.generator, self.config, self.checkpoint = modules, generator, config, checkpoint
        self.params = [p for m in modules.values() for p in m.parameters()]
        for m in modules.values():
            m.requires_grad_(True)  # train/eval mode is the caller's (the text encoders train without dropout)
        self.ema = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.params, lr=lr0, weight_decay=config.weight_decay, betas=(0.9, 0.99))
        self.start, self.history, self.running = 0, [], None

    def restore(self) -> None:
        """Continue from ``checkpoint`` when it exists: weights, EMA, optimizer, generator and global RNG, log."""
        import torch

        if self.checkpoint is None or not self.checkpoint.is_file():
            return
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        for key, m in self.modules.items():
            m.load_state_dict(state["modules"][key])
        if state.get("finished"):  # compact result (see finished_state): the modules hold the EMA
            self.ema = [p.detach().clone() for p in self.params]
        else:
            for e, saved in zip(self.ema, state["ema"]):
                e.copy_(saved)
            self.opt.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.start, self.history, self.running = state["step"], state["history"], state["running"]

    def save(self, step: int, finished: bool = False) -> None:
        import torch

        if self.checkpoint is None:
            return
        state = {"step": step, "modules": {k: m.state_dict() for k, m in self.modules.items()},
                 "ema": self.ema, "optimizer": self.opt.state_dict(), "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "history": self.history, "running": self.running}
        atomic_save(finished_state(state, self.modules) if finished else state, self.checkpoint)

    def step(self, step: int, loss_fn: Callable[[int], "torch.Tensor"], lr: float):
        """One optimizer step at 0-based ``step``; returns (loss, gradient norm before clipping)."""
        import torch

        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = loss_fn(step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.opt.step()
        decay = min(self.config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema, self.params):
                e.lerp_(p.detach(), 1 - decay)
        self.running = loss.item() if self.running is None else 0.98 * self.running + 0.02 * loss.item()
        return loss, grad_norm


def optimise(name: str, modules: dict, loss_fn: Callable[[int], "torch.Tensor"], total: int,
             lr_at: Callable[[int], float], generator, config: TeacherConfig, checkpoint: Optional[Path] = None,
             budget: Optional[Budget] = None, progress: bool = True, log: Optional[Callable[[dict], None]] = None,
             checkpoint_minutes: float = 10.0) -> StageResult:
    """A resumable AdamW loop over the parameters of ``modules`` (betas 0.9/0.99, gradient clipping at
    ``config.max_grad_norm``, EMA with decay min(ema_decay, (1 + step)/(10 + step))).

    ``loss_fn(step)`` draws its batch from ``generator``. With ``checkpoint``, the loop resumes from that file
    when it exists and writes it (weights, EMA, optimizer, generator state, log) every ``checkpoint_minutes``,
    when ``budget`` runs out (returns a paused result) and at the end, so an interrupted stage continues
    bit-identically.
    """
    loop = _Loop(modules, lr_at(0), generator, config, checkpoint)
    loop.restore()
    bar = progress_bar(total, f"{name} steps", progress)
    bar.update(loop.start)
    last_save = time.monotonic()
    step, paused = loop.start, False
    while step < total:
        loss, grad_norm = loop.step(step, loss_fn, lr_at(step))
        step += 1
        bar.update(1)
        if step % 50 == 0 or step == total:
            entry = {"step": step, "loss": loss.item(), "loss_smoothed": loop.running, "lr": lr_at(step - 1),
                     "grad_norm": float(grad_norm)}
            loop.history.append(entry)
            bar.set_postfix(loss=f"{loop.running:.4f}")
            if log:
                log({"stage": name, **entry})
        if step < total and budget is not None and budget.spend():
            paused = True
            break
        if checkpoint is not None and time.monotonic() - last_save >= 60 * checkpoint_minutes:
            loop.save(step)
            last_save = time.monotonic()
    bar.close()
    if step > loop.start or (checkpoint is not None and not checkpoint.is_file()):
        loop.save(step, finished=not paused)
    for m in modules.values():
        m.requires_grad_(False)
    if paused:
        return StageResult(step, total, loop.history)
    return StageResult(step, total, loop.history, ema_state_dicts(modules, loop.params, loop.ema))


def finished_state(state: dict, modules: dict) -> dict:
    """The compact checkpoint of a finished stage: what the later stages read and nothing to resume training.

    A finished stage is only ever read for its EMA (the next stage starts from it) and for the generator and
    global RNG state it leaves behind, so the optimizer moments and the raw weights are dropped and the
    modules' state dicts hold the EMA in place of every parameter: about a quarter of a paused checkpoint
    (a build's state folder can then be kept, e.g. committed, between sessions). :meth:`_Loop.restore` reads
    both forms; the results of the stage are the same (tests/test_shapes_teacher.py).
    """
    if state.get("finished"):
        return state
    params = [p for m in modules.values() for p in m.parameters()]
    saved = {key: m.state_dict() for key, m in modules.items()}
    current = {key: {k: v.detach().clone() for k, v in sd.items()} for key, sd in saved.items()}
    for key, m in modules.items():  # take the EMA through the modules (tied weights: every name)
        m.load_state_dict(state["modules"][key])
    ema = ema_state_dicts(modules, params, state["ema"])
    for key, m in modules.items():
        m.load_state_dict(current[key])
    compact = {k: v for k, v in state.items() if k not in ("ema", "optimizer", "modules")}
    return {**compact, "modules": ema, "finished": True}


def compact_finished_checkpoint(path: Path, modules: dict) -> bool:
    """Rewrite a finished stage's full checkpoint at ``path`` in the compact form (modules: the stage's modules,
    for the parameter order); False when it is already compact. Used on state folders written before the
    compact form existed."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("finished"):
        return False
    atomic_save(finished_state(state, modules), path)
    return True


def ema_state_dicts(modules: dict, params: list, ema: list) -> dict:
    """State dicts of ``modules`` with the EMA in place of every parameter. Taken through the modules
    themselves, so tied weights (T5's ``shared`` = ``encoder.embed_tokens``) get the EMA under every name."""
    import torch

    with torch.no_grad():
        trained = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):
            p.copy_(e)
        out = {key: {k: v.detach().clone() for k, v in m.state_dict().items()} for key, m in modules.items()}
        for p, saved in zip(params, trained):
            p.copy_(saved)
    return out


def load_ema(modules: dict, checkpoint: dict) -> None:
    """Load an :func:`optimise` checkpoint's EMA into ``modules`` (the same modules, in the same order)."""
    import torch

    for key, module in modules.items():
        module.load_state_dict(checkpoint["modules"][key])
    if checkpoint.get("finished"):  # compact: the modules' state dicts are the EMA already
        return
    params = [p for m in modules.values() for p in m.parameters()]
    with torch.no_grad():
        for p, e in zip(params, checkpoint["ema"], strict=True):
            p.copy_(e)
