"""Experiment trackers (``--report_to tensorboard|wandb|all|none``) through accelerate's own trackers.

* tensorboard: event files under ``OUT/logs/t2i-distill-<method>/``;
* wandb: the run folder under ``OUT/wandb/`` (never ``./wandb`` where the command was started); it works
  offline with ``WANDB_MODE=offline`` (sync later with ``wandb sync OUT/wandb/offline-run-*``).
The scalars (every loss term, tangent norm, adaptive weights, lr, grad norm, skipped steps, samples/s)
come from :class:`training.hooks.MetricsLogger`, the images from :class:`training.validation.Validation`;
the run configuration is stored once, when the trackers start.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from accelerate import Accelerator

REPORT_TO = ("tensorboard", "wandb", "all", "none")


def tracker_config(config: dict) -> dict:
    """The run config as tracker hyper-parameters: scalars as they are, sequences and paths as text."""
    out = {}
    for key, value in config.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = "None" if value is None else value
        else:
            out[key] = str(list(value)) if isinstance(value, (list, tuple)) else str(value)
    return out


def start_trackers(accelerator: Accelerator, project: str, config: dict, output_dir: str) -> None:
    """Main process: start the ``--report_to`` trackers with the run config (no-op for ``none``)."""
    wandb_dir = Path(output_dir).absolute()
    accelerator.init_trackers(project, config=tracker_config(config), init_kwargs={"wandb": {"dir": str(wandb_dir)}})


def log_images(accelerator: Accelerator, name: str, image: np.ndarray, step: int) -> None:
    """Log one RGB image [H, W, 3] (uint8) to every tracker that takes images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [image]}, step=step)
