"""Checkpoints that survive crashes: write to a temporary name, rename into place when complete.

Layout of a run folder:
    ckpts/transformer_<step>.pt              lightweight export {'module', 'config', 'step'} (original format)
    checkpoints/checkpoint-<step>/           full resumable state (accelerate ``save_state``: model, optimizer,
                                             LR scheduler, per-rank RNG, train state) + run_config.json
    checkpoints/.checkpoint-<step>.tmp/      a save in progress; never read, removed by the next save
    checkpoints/.checkpoint-<step>.old/      a checkpoint being replaced or pruned; never read, removed likewise

Crash safety rests on one POSIX guarantee: ``rename`` of a directory is atomic.  A directory named
``checkpoint-<step>`` therefore only ever exists once every rank has finished writing it and its
files were flushed to disk (fsync), so a ``kill -9`` (or a power cut) at any moment leaves the
newest complete checkpoint loadable.  Deletion goes the other way round: a checkpoint is first
renamed to a hidden name, then removed, so a half-deleted folder is never mistaken for a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

logger = logging.getLogger("t2i_distill")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RUN_CONFIG = "run_config.json"
# Fields of the run config that must match when resuming: they change what the saved state means
# (which model and loss it belongs to, its tensor shapes, how the data stream is shuffled, sharded and
# batched, and the on-disk format of the optimizer state, which differs between DeepSpeed and DDP).
RESUME_INVARIANTS = ("method", "pretrained_model_name_or_path", "rescaled_checkpoint_path", "resolution",
                     "timestep_scale", "train_batch_size", "gradient_accumulation_steps", "num_processes",
                     "distributed_type", "seed", "lora_rank", "lora_alpha", "lora_target_modules", "lora_dropout",
                     "streaming", "streaming_shuffle_buffer", "max_train_samples")
# Flags that may legitimately change between a run and its resumption, without a warning.
RESUME_FREE = ("resume_from_checkpoint", "output_dir", "max_train_steps", "checkpointing_steps",
               "checkpoints_total_limit", "exports_total_limit", "report_to", "logging_steps", "dataloader_num_workers", "cache_dir",
               "max_nonfinite_steps", "max_bad_sample_fraction", "step", "validation_prompt", "validation_prompts_file",
               "validation_steps", "num_validation_images", "validation_resolution", "validation_guidance_scale",
               "validation_seed")


def _fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk (directories: so a rename inside it is durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. certain network mounts) refuse fsync on directories
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file below ``root``, then the directories, so a later rename publishes complete data."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``.<name>.tmp`` next to ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete full-state checkpoints ``(step, folder)``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir() and (p / RUN_CONFIG).is_file()]
    return sorted(found)


def resolve_resume_path(output_dir: str, resume: str) -> Path | None:
    """'latest' → newest complete checkpoint of ``output_dir`` (None if there is none yet); else that folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume} is not a complete checkpoint folder "
                                f"(expected {path}/{RUN_CONFIG}); use 'latest' or an OUT/checkpoints/checkpoint-<step> "
                                "folder")
    return path


def read_run_config(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / RUN_CONFIG).read_text())


def _jsonable(config: dict) -> dict:
    """The config as it reads back from run_config.json (tuples → lists, paths → str)."""
    return json.loads(json.dumps(config, default=str))


def check_resume_config(checkpoint: Path, current: dict, extra_invariants: tuple[str, ...] = ()) -> list[str]:
    """Refuse to resume a different run; return the (harmless) flags that changed, for a warning.

    Raises ``ValueError`` naming every invariant that differs (method, model, resolution, batch
    layout, number of processes, ...): resuming would silently load a state that does not fit.
    """
    saved = read_run_config(checkpoint)
    current = _jsonable(current)
    keys = tuple(RESUME_INVARIANTS) + tuple(extra_invariants)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in keys if (k in current or k in saved) and saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {checkpoint}: the run configuration changed ({'; '.join(diffs)}). "
                         "Resume with the same settings, or start a new --output_dir.")
    return sorted(k for k in set(saved) | set(current)
                  if k not in keys and k not in RESUME_FREE and saved.get(k) != current.get(k))


def _remove_hidden(root: Path) -> None:
    """Remove leftovers of interrupted saves/prunes (hidden names: never read as checkpoints)."""
    for stale in list(root.glob(".checkpoint-*.tmp")) + list(root.glob(".checkpoint-*.old")):
        shutil.rmtree(stale, ignore_errors=True)


def begin_checkpoint(output_dir: str, step: int) -> Path:
    """Main process: make an empty temporary folder for ``step`` (removing stale ones)."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_hidden(root)
    tmp = root / f".checkpoint-{step}.tmp"
    tmp.mkdir()
    return tmp


def _retire(folder: Path) -> None:
    """Delete a checkpoint folder so that no crash can leave a half-deleted ``checkpoint-*``."""
    hidden = folder.with_name(f".{folder.name}.old")
    if hidden.exists():
        shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def finish_checkpoint(tmp: Path, step: int, run_config: dict, total_limit: int | None) -> Path:
    """Main process, after every rank wrote into ``tmp``: add run_config.json, flush, rename, prune."""
    atomic_write_text(tmp / RUN_CONFIG, json.dumps({**run_config, "step": step}, indent=2, default=str))
    fsync_tree(tmp)
    final = tmp.parent / f"checkpoint-{step}"
    if final.exists():  # the same step saved again (e.g. a stop right after the periodic save of a resumed run)
        _retire(final)
    os.replace(tmp, final)
    _fsync_path(final.parent)
    if total_limit is not None and total_limit > 0:
        for _, old in list_checkpoints(final.parent.parent)[:-total_limit]:
            try:
                _retire(old)
            except OSError as exc:  # the new checkpoint is published; a failed prune must not fail the save
                logger.warning("could not remove the old checkpoint %s: %s", old, exc)
    return final


def abort_checkpoint(output_dir: str, step: int) -> None:
    """Main process: remove the temporary folder of a failed save (best effort)."""
    shutil.rmtree(Path(output_dir) / "checkpoints" / f".checkpoint-{step}.tmp", ignore_errors=True)


def export_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "ckpts" / f"transformer_{step}.pt"


def ema_export_path(output_dir: str | os.PathLike, step: int) -> Path:
    """The EMA weights of step ``step`` (``--use_ema``), beside :func:`export_path`."""
    return Path(output_dir) / "ckpts" / f"transformer_{step}_ema.pt"


def ema_sibling(export: str | os.PathLike) -> Path | None:
    """``.../transformer_<step>.pt`` → ``.../transformer_<step>_ema.pt`` (None for any other name)."""
    export = Path(export)
    match = re.fullmatch(r"transformer_(\d+)\.pt", export.name)
    return export.with_name(f"transformer_{match.group(1)}_ema.pt") if match else None


def prune_exports(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Remove all but the newest ``keep`` ``ckpts/transformer_<step>.pt`` files and their ``_ema.pt`` (None/0: keep all)."""
    if not keep or keep < 1:
        return
    found = sorted((int(m.group(1)), p) for p in (Path(output_dir) / "ckpts").glob("transformer_*.pt")
                   if (m := re.fullmatch(r"transformer_(\d+)\.pt", p.name)))
    for step, old in found[:-keep]:
        for path in (old, ema_export_path(output_dir, step)):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # pruning is best effort, as for full checkpoints
                logger.warning("could not remove the old export %s: %s", path, exc)


def export_transformer(path: str | os.PathLike, state_dict: dict, config: dict, step: int) -> None:
    """The original release's ``{'module': state_dict}`` file, plus our config and step (atomic)."""
    cpu_state = {k: v.detach().to("cpu").clone() for k, v in state_dict.items()}
    atomic_torch_save({"module": cpu_state, "config": dict(config), "step": step}, path)
