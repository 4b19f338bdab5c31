"""Checkpoints that survive crashes: write to a temporary name, rename into place when complete.

Layout of a run folder:
    ckpts/transformer_<step>.pt              lightweight export {'module', 'config', 'step'} (original format)
    checkpoints/checkpoint-<step>/           full resumable state (accelerate ``save_state``: model, optimizer,
                                             LR scheduler, per-rank RNG, train state) + run_config.json
    checkpoints/.checkpoint-<step>.tmp/      a save in progress; never read, removed by the next save

A directory named ``checkpoint-<step>`` exists only once every rank has finished writing it, so a
``kill -9`` at any moment leaves the newest complete checkpoint loadable.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Fields of the run config that must match when resuming: they change what the state means.
RESUME_INVARIANTS = ("method", "pretrained_model_name_or_path", "resolution", "timestep_scale", "train_batch_size",
                     "gradient_accumulation_steps", "num_processes")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete full-state checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def resolve_resume_path(output_dir: str, resume: str) -> Path | None:
    """'latest' → newest complete checkpoint (None if there is none yet); else the given folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "run_config.json").exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume} is not a complete checkpoint folder "
                                f"(expected {path}/run_config.json); use 'latest' or a checkpoints/checkpoint-<step> folder")
    return path


def check_resume_config(checkpoint: Path, current: dict) -> None:
    saved = json.loads((checkpoint / "run_config.json").read_text())
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in RESUME_INVARIANTS if k in current and saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {checkpoint}: the run configuration changed ({'; '.join(diffs)}). "
                         "Resume with the same settings, or start a new --output_dir.")


def begin_checkpoint(output_dir: str, step: int) -> Path:
    """Main process: make an empty temporary folder for ``step`` (removing stale ones)."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".checkpoint-{step}.tmp"
    tmp.mkdir()
    return tmp


def finish_checkpoint(tmp: Path, step: int, run_config: dict, total_limit: int | None) -> Path:
    """Main process, after every rank wrote into ``tmp``: add run_config.json, rename, prune."""
    atomic_write_text(tmp / "run_config.json", json.dumps({**run_config, "step": step}, indent=2, default=str))
    final = tmp.parent / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None and total_limit > 0:
        for _, old in list_checkpoints(tmp.parent.parent)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def export_transformer(path: str | os.PathLike, state_dict: dict, config: dict, step: int) -> None:
    """The original release's ``{'module': state_dict}`` file, plus our config and step (atomic)."""
    cpu_state = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    atomic_torch_save({"module": cpu_state, "config": dict(config), "step": step}, path)
