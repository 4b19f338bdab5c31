"""Loading teachers and students: stock FLUX folders/hub ids, rescaled checkpoints, training exports.

Checkpoint formats accepted by :func:`read_checkpoint`:
* ``.pt`` / ``.pth`` / ``.bin``: a dict with the state dict under ``"module"`` (the original release's
  format); our exports add ``"config"`` (the transformer config, incl. ``timestep_scale``) and ``"step"``.
* ``.safetensors``: a flat state dict; our exports store the config as JSON in the metadata.
* a diffusers folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``), or a pipeline folder
  with a ``transformer/`` subfolder.

Loading is strict: missing or unexpected keys and shape mismatches are errors that name the keys —
the original release's ``strict=False`` silently trained half-initialised models.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open
from torch import nn

from .transformer import DistillFluxTransformer2DModel

# Keys in checkpoints that belong to training-time heads, not to the transformer.
AUXILIARY_PREFIXES = ("logvar_linear.",)
# The original release's names for the MeanFlow interval embedder.
LEGACY_RENAMES = {"timestep_embedder2.": "time_text_embed.interval_embedder."}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what is wrong and what to do."""


@dataclass
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict | None = None  # transformer config when the file carries one
    step: int | None = None
    path: str = ""
    auxiliary: dict[str, torch.Tensor] = field(default_factory=dict)


def _split_auxiliary(state: dict) -> tuple[dict, dict]:
    """(transformer weights with the release's names mapped to ours, training-time heads such as logvar_linear)."""
    main, aux = {}, {}
    for key, value in state.items():
        for old, new in LEGACY_RENAMES.items():
            if key.startswith(old):
                renamed = new + key[len(old):]
                if renamed in state:
                    raise CheckpointError(f"the checkpoint has both {key} (the original release's name) and {renamed}: "
                                          "one interval embedder too many. Keep one of them.")
                key = renamed
        (aux if key.startswith(AUXILIARY_PREFIXES) else main)[key] = value
    return main, aux


def _not_a_model_folder(path: Path) -> str:
    """Why ``path`` (a folder) is not a model, naming the file to use for a training-state folder."""
    step = path.name.rpartition("-")[2]
    if (path / "run_config.json").is_file() and path.name.startswith("checkpoint-") and step.isdigit():
        export = path.parent.parent / "ckpts" / f"transformer_{step}.pt"
        return (f"{path} is a full training state (for --resume_from_checkpoint), not a model export: "
                f"use {export}{'' if export.is_file() else ' (written by the same run; not found here)'}")
    return (f"{path} is a folder but not a diffusers transformer folder "
            "(expected config.json and diffusion_pytorch_model*.safetensors)")


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a transformer checkpoint in any supported format (see module doc)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}. Pass an existing .pt/.safetensors file or a diffusers folder.")
    config, step = None, None
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer" / "config.json").exists() else path
        files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if not (folder / "config.json").exists() or not files:
            raise CheckpointError(_not_a_model_folder(path))
        state = {}
        for f in files:
            state.update(load_file(f))
        config = json.loads((folder / "config.json").read_text())
    elif path.suffix == ".safetensors":
        state = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        config = json.loads(meta["config"]) if "config" in meta else None
        step = int(meta["step"]) if "step" in meta else None
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no 2x RAM for 8B files
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise CheckpointError(f"could not read {path} as a torch checkpoint: {exc}") from exc
        if not isinstance(payload, dict) or "module" not in payload:
            keys = list(payload)[:5] if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"{path} has no 'module' key (found {keys}). The trainers read "
                                  "{'module': transformer_state_dict}, as the original release writes.")
        state, config, step = payload["module"], payload.get("config"), payload.get("step")
    main, aux = _split_auxiliary(state)
    return LoadedCheckpoint(main, config, step, str(path), aux)


def check_timestep_scale(ckpt: LoadedCheckpoint, expected: float) -> None:
    """Refuse a checkpoint whose own config says its time inputs use another scale."""
    if ckpt.config is None:
        return
    found = float(ckpt.config.get("timestep_scale", 1000.0))
    if found != float(expected):
        raise CheckpointError(
            f"{ckpt.path} was saved for timestep_scale={found:g} (time inputs in [0, {found:g}]) but the model "
            f"expects timestep_scale={expected:g}. Rescale the teacher first (script/rescale_teacher.sh) or "
            f"pass --timestep_scale {found:g}.")


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict that fails loudly, naming missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems) +
                              ". Is it a checkpoint of the same FLUX architecture (and, for MeanFlow, the dual-timestep student)?")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def load_flux_transformer(pretrained: str, timestep_scale: float, subfolder: str | None = "transformer",
                          revision: str | None = None, dtype: torch.dtype = torch.float32) -> DistillFluxTransformer2DModel:
    """Load a FLUX transformer (hub id or local pipeline/transformer folder) as our subclass."""
    local = Path(pretrained)
    if local.exists() and subfolder and not (local / subfolder).exists():
        subfolder = None  # a transformer folder rather than a pipeline folder
    return DistillFluxTransformer2DModel.from_pretrained(
        pretrained, subfolder=subfolder, revision=revision, timestep_scale=timestep_scale, dtype=dtype)


#: What :func:`load_transformer_weights` may be asked to load: a (rescaled) teacher, or a student of a method.
CHECKPOINT_KINDS = ("teacher", "scm", "meanflow")
_TAKES = {"teacher": "--rescaled_checkpoint_path (of train_sCM.py / train_meanflow.py / check_rescale.py), which takes "
                     "a rescaled teacher such as train_rescale.py's OUT/rescaled.pt",
          "scm": "this sCM loader", "meanflow": "this MeanFlow loader"}


def _kind_error(path: str, expect: str, has_interval: bool, has_logvar: bool) -> str | None:
    """Why a checkpoint with these parts cannot be loaded as ``expect`` (None when it can).

    Strict in both directions: parts the receiving model would have to drop (an sCM logvar head, a
    MeanFlow interval embedder) are refused, not silently discarded.
    """
    if has_interval and expect != "meanflow":
        return (f"{path} is a MeanFlow student (it has an interval (t - r) embedder, time_text_embed.interval_embedder.*) "
                f"and cannot be loaded by {_TAKES[expect]}. Sample it with test_meanflow.py --resume_path, or continue "
                "its run with train_meanflow.py --resume_from_checkpoint.")
    if has_logvar and expect != "scm":
        return (f"{path} is an sCM student export (it has an sCM logvar_linear head) and cannot be loaded by "
                f"{_TAKES[expect]}. Sample it with test_sCM.py --resume_path, or continue its run with train_sCM.py "
                "--resume_from_checkpoint.")
    if expect == "meanflow" and not has_interval:
        return f"{path} has no interval (t - r) embedder: it is not a MeanFlow student checkpoint."
    return None


def load_transformer_weights(transformer: DistillFluxTransformer2DModel, path: str, *, expect: str = "teacher",
                             require_interval: bool = False) -> LoadedCheckpoint:
    """Load rescaled/exported weights into ``transformer`` strictly (checking ``timestep_scale``).

    ``expect`` says what the file must be (:data:`CHECKPOINT_KINDS`): a "teacher" has neither an sCM
    logvar head nor a MeanFlow interval embedder (MeanFlow callers add the embedder afterwards with
    ``enable_interval_embedding``); an "scm" export may carry the logvar head (set aside in
    ``auxiliary``); a "meanflow" student must have the interval embedder (``require_interval`` is the
    older spelling of ``expect="meanflow"``).
    """
    expect = "meanflow" if require_interval else expect
    if expect not in CHECKPOINT_KINDS:
        raise ValueError(f"expect must be one of {CHECKPOINT_KINDS}, got {expect!r}")
    ckpt = read_checkpoint(path)
    check_timestep_scale(ckpt, transformer.timestep_scale)
    has_interval = any(k.startswith("time_text_embed.interval_embedder.") for k in ckpt.state_dict)
    problem = _kind_error(str(path), expect, has_interval, bool(ckpt.auxiliary))
    if problem:
        raise CheckpointError(problem)
    if has_interval:
        transformer.enable_interval_embedding("zero")  # weights come from the checkpoint
    load_state_dict_strict(transformer, ckpt.state_dict, source=str(path))
    return ckpt
