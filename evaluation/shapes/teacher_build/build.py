"""The staged, resumable teacher build (stages in :func:`build_teacher`'s doc) and :func:`ensure_teacher`.

Every stage runs in a fixed order with fixed seeds, so a build is bitwise reproducible for a seed and thread
count, and a build stopped by its :class:`~.optim.Budget` continues from the state folder bit-identically.
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from evaluation.shapes.teacher_build.common import (BUILD_INFO_NAME, UNCONDITIONAL_PROMPT, PathLike,
                                                    images_from_rows)
from evaluation.shapes.teacher_build.flow import adaln_zero_init, encode_latents, run_flow_matching, tag_row_weights
from evaluation.shapes.teacher_build.guidance import run_guidance_distillation
from evaluation.shapes.teacher_build.optim import Budget
from evaluation.shapes.teacher_build.recipes import TeacherConfig, config_key, teacher_recipe, tiny_flux_config
from evaluation.shapes.teacher_build.scoring import evaluate_stored
from evaluation.shapes.teacher_build.state import (full_log, open_state_dir, paused_report, publish,
                                                   read_build_info, tmp_sibling)
from evaluation.shapes.teacher_build.text import TrainableText, caption_targets, frozen_text, run_text_pretraining
from evaluation.shapes.teacher_build.vae import vae_stage


@dataclass
class _Build:
    """One call of :func:`build_teacher`: where it writes, its budget, its log and stage timings."""

    config: TeacherConfig
    output_dir: Path
    tmp: Path
    state: Path
    staged: bool  # a --state_dir was given: stages checkpoint there
    budget: Optional[Budget]
    progress: bool
    timings: dict = field(default_factory=dict)
    log_lines: list = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.state / "train_log.jsonl"

    def log(self, entry: dict) -> None:
        line = json.dumps(entry)
        self.log_lines.append(line)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def checkpoint(self, name: str) -> Optional[Path]:
        return self.state / name if self.staged else None

    @contextmanager
    def timed(self, key: str):
        t0 = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t0


@dataclass
class _TrainingSet:
    """The encoded training set: rows, latents, caption index into the sorted unique captions, FLUX ids."""

    rows: list
    conditioner: Any
    latents: Any
    latent_std: float
    unique: list
    caption_index: Any
    txt_ids: Any
    img_ids: Any


def _row_weights(rows: list, config: TeacherConfig):
    """Flow matching's draw weight of each training row from its tag (None: uniform rows)."""
    if not config.flow_tag_weights:
        return None
    return tag_row_weights([json.loads(r["metadata"])["tag"] for r in rows], config.flow_tag_weights)


def build_teacher(output_dir: PathLike, config: Optional[TeacherConfig] = None, progress: bool = True,
                  evaluate: bool = True, state_dir: Optional[PathLike] = None, budget: Optional[Budget] = None,
                  reuse_vae_from: Optional[PathLike] = None) -> dict:
    """Build the teacher pipeline into ``output_dir`` (replacing it) and return the build report.

    Stages (times in the report): pipeline skeleton → VAE training → latent statistics and
    reconstruction check → latents/text embeddings of the training set → flow-matching training (with the
    text encoders when ``train_text_encoders``) → guidance distillation (``distill_steps``) → save (float16
    transformer) → reload and score ``eval_steps``-step samples of held-out prompts.

    With ``state_dir`` every stage keeps its resumable state there (VAE folder, ``flow.pt``,
    ``distill.pt``); a later call with the same config continues where the last one stopped, bit-identically.
    With ``budget`` the call stops when it runs out and returns ``{"status": "paused", ...}`` without
    writing ``output_dir``. ``reuse_vae_from``: take the VAE of a teacher folder built with the same VAE
    settings instead of training it again.
    """
    config = config or TeacherConfig()
    config.validate()
    if budget is not None and state_dir is None:
        raise ValueError("a time/step budget needs a state folder to resume from (pass --state_dir)")
    output_dir = Path(output_dir).resolve()
    started = time.perf_counter()
    tmp = tmp_sibling(output_dir)
    state = Path(state_dir).resolve() if state_dir is not None else tmp / "state"
    open_state_dir(state, config)
    build = _Build(config, output_dir, tmp, state, state_dir is not None, budget, progress)
    try:
        return _run_stages(build, started, evaluate, Path(reuse_vae_from) if reuse_vae_from else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_stages(build: _Build, started: float, evaluate: bool, reuse_vae_from: Optional[Path]) -> dict:
    """Every stage in order; the paused report of the first stage whose budget runs out, else the build info."""
    config = build.config
    with build.timed("skeleton_s"):
        pipe = _skeleton(build)
    with build.timed("render_s"):
        rows, images, check_images, check_specs = _render(config, build.progress)
    with build.timed("vae_s"):
        vae_report, vae_source = vae_stage(pipe, images, check_images, check_specs, config, build.state,
                                           reuse_vae_from, build.progress, build.log)
        if build.progress:
            print(f"VAE ({vae_source}): mean |error| {vae_report['mean_abs_error_8bit']:.2f}/255, scorer accuracy on "
                  f"reconstructions {100 * vae_report['scorer_accuracy_reconstructed']:.1f}%", file=sys.stderr)
    with build.timed("encode_s"):
        data = _encode_training_set(pipe, rows, images, config, build.progress)
    del images
    if config.text_pretrain_steps:
        paused = _text_pretraining_stage(build, pipe, data)
        if paused:
            return paused
    paused, history = _flow_matching_stage(build, pipe, data)
    if paused:
        return paused
    if config.distill_steps:
        paused, history = _guidance_distillation_stage(build, pipe, data)
        if paused:
            return paused
    with build.timed("save_s"):
        final = _save(build, pipe)
    evaluation = None
    if evaluate and config.eval_prompts_per_tag > 0 and config.eval_samples > 0:
        with build.timed("eval_s"):
            evaluation = evaluate_stored(final, config, build.tmp, build.progress)
    build.timings["total_s"] = time.perf_counter() - started
    info = _build_info(build, pipe, vae_report, vae_source, data.latent_std, history, evaluation)
    (final / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    publish(final, build.output_dir)
    return info


def _skeleton(build: _Build):
    """1. The pipeline skeleton: tokenizers, text encoders (random), scheduler, untrained VAE/transformer."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline

    from data.tiny_flux import build_tiny_flux_pipeline

    config, name = build.config, build.output_dir.name
    build_tiny_flux_pipeline(build.tmp / "skeleton", seed=config.seed, config=tiny_flux_config(config))
    pipe = FluxPipeline.from_pretrained(build.tmp / "skeleton", dtype=torch.float32)
    # from_pretrained records the (temporary) source path; keep the saved configs free of it
    pipe.register_to_config(_name_or_path=name)
    pipe.transformer.register_to_config(_name_or_path=f"{name}/transformer")
    if not config.vae_mid_block_attention:
        # rebuild the VAE without mid-block attention (same class; fully convolutional)
        torch.manual_seed(config.seed)
        vae_config = dict(pipe.vae.config)
        vae_config["mid_block_add_attention"] = False
        pipe.vae = AutoencoderKL.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
    return pipe


def _render(config: TeacherConfig, progress: bool):
    """2. Data: training prompts only, tags balanced; 256 held-out images for the VAE check.
    Returns (training rows, their images, check images, check metadata)."""
    from evaluation.shapes.domain import generate_examples

    rows = generate_examples(config.num_images, config.resolution, config.seed, "train", progress=progress)
    images = images_from_rows(rows)
    check_rows = generate_examples(256, config.resolution, config.seed + 1, "heldout")
    check_images = images_from_rows(check_rows)
    check_specs = [json.loads(r["metadata"]) for r in check_rows]
    return rows, images, check_images, check_specs


def _encode_training_set(pipe, rows: list, images, config: TeacherConfig, progress: bool) -> _TrainingSet:
    """4. Latents and caption rows through the trainers' conditioner (text is encoded per stage)."""
    import torch

    from model.flux_io import FluxConditioner

    captions = [r["llava"] for r in rows]
    conditioner = FluxConditioner(pipe, "cpu", config.max_sequence_length)
    latents = encode_latents(conditioner, images, progress=progress)
    latent_std = float(latents.std())
    unique = sorted(set(captions))
    caption_index = torch.tensor(_index_of(captions, unique), dtype=torch.long)
    txt_ids = conditioner.encode_prompts([UNCONDITIONAL_PROMPT])[2]
    img_ids = conditioner.image_ids(config.resolution, config.resolution)
    return _TrainingSet(rows, conditioner, latents, latent_std, unique, caption_index, txt_ids, img_ids)


def _text_pretraining_stage(build: _Build, pipe, data: _TrainingSet) -> Optional[dict]:
    """5. Caption-parsing pretraining of the text encoders (v3, v4); the paused report, or None when done."""
    import torch

    config = build.config
    with build.timed("text_pretrain_s"):
        spec_of = {r["llava"]: json.loads(r["metadata"]) for r in data.rows}
        targets = torch.tensor([caption_targets(spec_of[c]) for c in data.unique] + [caption_targets(None)])
        pretrained = run_text_pretraining(TrainableText(pipe, data.unique, config.max_sequence_length), targets,
                                          config, build.checkpoint("text.pt"), build.budget, build.progress, build.log)
    if not pretrained.done:
        return paused_report(build.state, "text_pretraining", pretrained)
    pipe.text_encoder.load_state_dict(pretrained.ema["text_encoder"])
    pipe.text_encoder_2.load_state_dict(pretrained.ema["text_encoder_2"])
    return None


def _flow_matching_stage(build: _Build, pipe, data: _TrainingSet) -> tuple[Optional[dict], list]:
    """6. Flow matching (with the text encoders when ``train_text_encoders``); (paused report or None, log)."""
    import torch

    config = build.config
    with build.timed("transformer_s"):
        torch.manual_seed(config.seed)
        if config.adaln_zero_init:
            adaln_zero_init(pipe.transformer)
        modules = {"transformer": pipe.transformer}
        if config.train_text_encoders:
            text = TrainableText(pipe, data.unique, config.max_sequence_length)
            modules.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
        else:
            text = frozen_text(data.conditioner, data.unique, build.progress)
        flow = run_flow_matching(modules, text, data.latents, data.caption_index, data.txt_ids, data.img_ids, config,
                                 build.checkpoint("flow.pt"), build.budget, build.progress, build.log,
                                 _row_weights(data.rows, config))
    if not flow.done:
        return paused_report(build.state, "flow_matching", flow), flow.history
    for key, module in modules.items():
        module.load_state_dict(flow.ema[key])
        module.eval().requires_grad_(False)
    return None, flow.history


def _guidance_distillation_stage(build: _Build, pipe, data: _TrainingSet) -> tuple[Optional[dict], list]:
    """7. Guidance distillation: the student (from the CFG teacher) takes the CFG scale as its guidance input."""
    with build.timed("distill_s"):
        teacher = copy.deepcopy(pipe.transformer)
        frozen = frozen_text(data.conditioner, data.unique, build.progress)
        distilled = run_guidance_distillation(pipe.transformer, teacher, frozen, data.latents, data.caption_index,
                                              data.txt_ids, data.img_ids, build.config,
                                              build.checkpoint("distill.pt"), build.budget, build.progress,
                                              build.log)
    if not distilled.done:
        return paused_report(build.state, "guidance_distillation", distilled), distilled.history
    pipe.transformer.load_state_dict(distilled.ema["transformer"])
    return None, distilled.history


def _save(build: _Build, pipe) -> Path:
    """8. Save: float16 transformer (loaded back as float32 by diffusers), float32 elsewhere, the whole log."""
    import torch

    final = build.tmp / "pipeline"
    pipe.transformer.to(torch.float16)
    pipe.save_pretrained(final, safe_serialization=True)
    (final / "logs").mkdir()
    (final / "logs" / "teacher_train.jsonl").write_text(full_log(build.log_path, build.log_lines), encoding="utf-8")
    return final


def _build_info(build: _Build, pipe, vae_report: dict, vae_source: str, latent_std: float, history: list,
                evaluation: Optional[dict]) -> dict:
    """The ``teacher_build_info.json`` of a finished build."""
    import torch

    info = {
        "builder": "evaluation.shapes.teacher.build_teacher",
        "config": build.config.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "timings": {k: round(v, 2) for k, v in build.timings.items()},
        "vae": vae_report,
        "latent_std": latent_std,
        "transformer": {"parameters": sum(p.numel() for p in pipe.transformer.parameters()),
                        "stored_dtype": "float16", "timestep_scale": 1000,
                        "final_loss_smoothed": history[-1]["loss_smoothed"] if history else None},
        "evaluation": evaluation,
    }
    if vae_source != "trained":
        info["vae_source"] = vae_source
    if build.staged:
        info["timings_note"] = "timings of the last (resumed) call only; see the state folder's train_log.jsonl"
    return info


def _index_of(captions: Sequence[str], unique: Sequence[str]) -> list[int]:
    lookup = {c: i for i, c in enumerate(unique)}
    return [lookup[c] for c in captions]


def ensure_teacher(output_dir: PathLike, config: Optional[TeacherConfig] = None, force: bool = False,
                   progress: bool = True, evaluate: bool = True, state_dir: Optional[PathLike] = None,
                   budget: Optional[Budget] = None, reuse_vae_from: Optional[PathLike] = None
                   ) -> tuple[Path, dict, bool]:
    """Reuse the teacher in ``output_dir`` when it was built with ``config``; else (or with ``force``)
    build it (see :func:`build_teacher` for the other arguments). Returns ``(folder, build_info, rebuilt)``;
    a build stopped by ``budget`` returns the ``{"status": "paused"}`` report as ``build_info``."""
    config = config or teacher_recipe()
    folder = Path(output_dir).resolve()
    info = read_build_info(folder)
    if (not force and info is not None and (folder / "model_index.json").is_file()
            and config_key(info.get("config", {})) == config_key(config.to_dict())):
        return folder, info, False
    return folder, build_teacher(folder, config, progress, evaluate, state_dir, budget, reuse_vae_from), True

