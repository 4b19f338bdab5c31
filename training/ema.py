"""Exponential moving average (EMA) of the student's trainable weights (``--use_ema``).

After every applied optimizer update n = 1, 2, ... (n = the run's global step):
    θ̄_n = β_n·θ̄_{n−1} + (1 − β_n)·θ_n,        θ̄_0 = θ_0 (the student's initial weights)
    β_n = ``ema_decay``                             (classic EMA, e.g. 0.9999)
    β_n = (1 − 1/n)^(γ + 1),  γ = ``ema_power``      (power-function EMA, Karras et al. 2024, "EDM2" eq. 3)
The power-function EMA weighs the update of step k by ∝ k^γ, a profile that keeps the same *relative*
length whatever the run's length (β_1 = 0, so θ_0 is forgotten at once); larger γ = shorter average.

The average lives on the main process only (every rank holds the same weights: DDP, and DeepSpeed ZeRO-2,
which keeps the full 16-bit parameters on every rank), in float32, on the accelerator or (``--ema_device
cpu``) in host memory.  It is checkpointed in ``hook_states.pt`` (resumed bit for bit) and exported beside
the raw weights as ``ckpts/transformer_<step>_ema.pt`` in the same ``{'module': ...}`` format.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Iterator

import torch

from training import checkpointing as ckpt
from training.hooks import Hook, Update

if TYPE_CHECKING:
    from training.core import Run

logger = logging.getLogger("t2i_distill")


def ema_decay(step: int, decay: float, power: float | None) -> float:
    """β_n of the module docstring for update ``step`` = n ≥ 1."""
    if power is None:
        return decay
    return (1.0 - 1.0 / step) ** (power + 1.0)


class EMA(Hook):
    name = "ema"

    def __init__(self, decay: float = 0.9999, power: float | None = None, device: str | None = None):
        self.decay, self.power, self.device = decay, power, device
        self.shadow: dict[str, torch.Tensor] | None = None  # parameter name → float32 average
        self._loaded: dict[str, torch.Tensor] | None = None

    def _named_params(self, run: "Run") -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in run.unwrapped.named_parameters() if p.requires_grad}

    def on_train_start(self, run: "Run") -> None:
        if not run.main:
            return
        params = self._named_params(run)
        device = self.device or None
        self.shadow = {n: p.detach().to(device or p.device, torch.float32, copy=True) for n, p in params.items()}
        if self._loaded is not None:
            missing = sorted(set(self.shadow) - set(self._loaded))
            if missing:
                raise ValueError(f"the checkpoint's EMA has no entry for {len(missing)} trainable parameters "
                                 f"(e.g. {missing[:3]}): it belongs to another model. Start a new --output_dir.")
            for n, value in self.shadow.items():
                value.copy_(self._loaded[n])
            self._loaded = None
        elif run.state.step > 0:
            logger.warning("resuming without an EMA in the checkpoint: the EMA starts from the step-%d weights",
                           run.state.step)

    @torch.no_grad()
    def on_update(self, run: "Run", update: Update) -> None:
        if self.shadow is None:
            return
        beta = ema_decay(update.step, self.decay, self.power)
        params = self._named_params(run)
        names = list(self.shadow)
        current = (params[n].detach().to(self.shadow[n].device, torch.float32) for n in names)
        for name, value in zip(names, current):
            self.shadow[name].lerp_(value, 1.0 - beta)  # θ̄ + (1 − β)(θ − θ̄) = β·θ̄ + (1 − β)·θ

    @contextlib.contextmanager
    def applied(self, run: "Run") -> Iterator[None]:
        """Main process: the student's trainable weights replaced by the average, then restored bit for bit
        from a host-memory copy (what validation samples the EMA with; training never sees it)."""
        params = self._named_params(run)
        backup = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
        try:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.shadow[n])
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict | None:
        if self.shadow is None:
            return None
        return {"shadow": self.shadow, "decay": self.decay, "power": self.power}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = state["shadow"]

    def export_state_dict(self, run: "Run") -> tuple[dict, dict]:
        """The method's export of the student with every trainable tensor replaced by its average."""
        raw, config = run.method.export_state_dict(run.unwrapped)
        by_storage = {p.data_ptr(): self.shadow[n] for n, p in self._named_params(run).items() if p.numel()}
        # Same dtype as the raw export (bf16 under DeepSpeed), so both files load the same way.
        return {k: by_storage[v.data_ptr()].to(v.dtype) if v.numel() and v.data_ptr() in by_storage else v
                for k, v in raw.items()}, config

    def on_save(self, run: "Run", step: int) -> None:
        if self.shadow is None:
            return
        if run.export is not None:  # the run writes its own export format (LoRA): the EMA tensors go through it
            with self.applied(run):
                run.export(run, step, suffix="_ema")
            return
        state, config = self.export_state_dict(run)
        ckpt.export_transformer(ckpt.ema_export_path(run.args.output_dir, step), state, config, step)
