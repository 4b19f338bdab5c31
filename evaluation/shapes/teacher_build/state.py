"""Files of a staged teacher build: the state folder (its config marker, progress, log), atomic publishing
of finished folders, build infos, and snapshots of an unfinished build as a ``FluxPipeline`` folder."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Sequence

from evaluation.shapes.teacher_build.common import BUILD_INFO_NAME, PathLike
from evaluation.shapes.teacher_build.optim import StageResult, load_ema
from evaluation.shapes.teacher_build.recipes import TeacherConfig, config_key, tiny_flux_config
from evaluation.shapes.teacher_build.text import caption_probe_class

STATE_CONFIG_NAME = "build_config.json"


def tmp_sibling(target: Path) -> Path:
    """A fresh hidden name beside ``target`` to build it under (its parent is created)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the finished ``tmp`` folder (old one moved aside first, then deleted)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_build_info(folder: PathLike) -> Optional[dict]:
    """The ``teacher_build_info.json`` of a teacher folder, or None when absent/unreadable."""
    try:
        return json.loads((Path(folder) / BUILD_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def open_state_dir(state_dir: Path, config: TeacherConfig) -> None:
    """Create ``state_dir`` for ``config``, or check that it already belongs to ``config``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    marker = state_dir / STATE_CONFIG_NAME
    if marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if config_key(saved) != config_key(config.to_dict()):
            raise ValueError(f"--state_dir {state_dir} holds a build with other settings ({marker}); resume it with "
                             "the same flags/recipe or choose an empty --state_dir")
    else:
        marker.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def full_log(log_path: Path, fallback: Sequence[str]) -> str:
    """The whole training log of a build (every call's lines, from the state folder when there is one)."""
    lines = log_path.read_text(encoding="utf-8").splitlines() if log_path.is_file() else list(fallback)
    return "\n".join(lines) + "\n"


def paused_report(state: Path, stage: str, result: StageResult) -> dict:
    """The ``{"status": "paused"}`` report of a stage stopped by its budget, also written to progress.json."""
    info = {"status": "paused", "stage": stage, "step": result.step, "total": result.total,
            "state_dir": str(state), "loss_smoothed": result.history[-1]["loss_smoothed"] if result.history else None}
    (state / "progress.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def snapshot_pipeline(state_dir: PathLike, output_dir: PathLike) -> dict:
    """Write the EMA weights of an unfinished (or finished) staged build in ``state_dir`` as a
    ``FluxPipeline`` folder, to score a build between stages. Returns ``{"stage", "step", "total"}``.

    The latest stage with a checkpoint wins: ``distill.pt`` (guidance-distilled transformer) over
    ``flow.pt`` (CFG teacher; text encoders from it in both cases) over ``text.pt`` (pretrained text
    encoders only, with the untrained transformer: for :func:`evaluation.shapes.diagnose.text_binding_report`).
    """
    import torch
    from diffusers import AutoencoderKL, FluxPipeline

    from data.tiny_flux import build_tiny_flux_pipeline

    state_dir, output_dir = Path(state_dir), Path(output_dir)
    if not any((state_dir / name).is_file() for name in ("text.pt", "flow.pt")):
        raise ValueError(f"{state_dir} has no text.pt or flow.pt yet: nothing to snapshot")
    config = TeacherConfig(**json.loads((state_dir / STATE_CONFIG_NAME).read_text(encoding="utf-8")))
    tmp = tmp_sibling(output_dir)
    try:
        build_tiny_flux_pipeline(tmp / "skeleton", seed=config.seed, config=tiny_flux_config(config))
        pipe = FluxPipeline.from_pretrained(tmp / "skeleton", dtype=torch.float32)
        pipe.vae = AutoencoderKL.from_pretrained(state_dir / "vae")
        where = _load_latest_checkpoints(pipe, state_dir, config)
        pipe.transformer.to(torch.float16)
        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
        publish(tmp / "pipeline", output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return where


def _load_latest_checkpoints(pipe, state_dir: Path, config: TeacherConfig) -> dict:
    """Load the EMA of text.pt, then flow.pt, then distill.pt (those present) into ``pipe``; the last one
    loaded names the stage."""
    import torch

    def load(name: str):
        return torch.load(state_dir / name, map_location="cpu", weights_only=False)

    modules = {"transformer": pipe.transformer}
    if config.train_text_encoders:
        modules.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    if (state_dir / "text.pt").is_file():  # pretrained encoders (kept as they are when frozen later)
        text = load("text.pt")
        probe = caption_probe_class()(pipe.text_encoder_2.config.d_model, pipe.text_encoder.config.hidden_size)
        load_ema({"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2, "probe": probe}, text)
        where = {"stage": "text_pretraining", "step": text["step"], "total": config.text_pretrain_steps}
    if (state_dir / "flow.pt").is_file():  # the transformer (and the encoders when trained jointly)
        flow = load("flow.pt")
        load_ema(modules, flow)
        where = {"stage": "flow_matching", "step": flow["step"], "total": config.steps}
    if (state_dir / "distill.pt").is_file():
        distill = load("distill.pt")
        load_ema({"transformer": pipe.transformer}, distill)
        where = {"stage": "guidance_distillation", "step": distill["step"], "total": config.distill_steps}
    return where
