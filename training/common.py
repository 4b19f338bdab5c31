"""Small pieces shared by the method losses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class TrainingError(RuntimeError):
    """A run stopped for a reason the user must act on (bad data, bad numbers, bad launch)."""


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    # Named intermediate tensors, checked for non-finite values when a step goes bad (diagnostics).
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


def per_sample_sq_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖² over all non-batch dimensions."""
    return x.flatten(1).square().sum(1)


def sample_guidance(batch: int, scales: tuple[float, ...], device) -> torch.Tensor:
    """Guidance-embedding scale per sample, uniformly from ``scales`` (the original's {4, 4.5, 5})."""
    choice = torch.randint(len(scales), (batch,), device=device)
    return torch.tensor(scales, device=device, dtype=torch.float32)[choice]
