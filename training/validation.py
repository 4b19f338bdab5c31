"""Validation images during training (``--validation_prompt``): the real few-step samplers at the method's
step counts, on fixed seeds, one grid PNG per validation step.

Rows of the grid, one per sampler (``validation_samplers``):
    sCM        the student at 1 and 2 steps            (SCMFluxPipeline, guidance 4.5)
    MeanFlow   the student at 2 and 4 steps            (MeanFlowFluxPipeline, guidance 3.5)
    rescale    the frozen ×1000 teacher and the rescaled student, both at 28 steps (FluxPipeline, 3.5); with
               ``--lora_rank`` the teacher is the student's own transformer in ``teacher_mode`` (adapters off,
               ×1000), i.e. the stock base; with ``--objective flow_matching`` there is no teacher row
With ``--use_ema`` the student's samplers are repeated on the EMA weights (rows "EMA ..."; the weights are
swapped in and restored bit for bit, :meth:`training.ema.EMA.applied`).
Columns: prompt i × image k (``--num_validation_images``).  Image k of prompt i uses the generator of the
sampling CLIs (``evaluation.generate.image_generators(--validation_seed, [(i, k)])``), the same at every
validation step, so a run's grids compare across steps and a tile matches what ``test_sCM.py --seed S``
gives for the exported weights of that step (to one grey level: the CLI batches prompts differently).  Written to ``OUT/validation/step_<step:07d>.png`` and
logged to the trackers as ``validation``.

The training random stream is untouched: sampling draws from its own generators and the global RNG
states (CPU and accelerator) are restored afterwards (``torch.random.fork_rng``), so the loss sequence is
identical with and without validation.  Only the main process samples; the other ranks wait at the
next collective of the step.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch
from PIL import Image, ImageDraw

from training.ema import EMA
from training.hooks import Hook, Update
from training.trackers import log_images

if TYPE_CHECKING:
    from training.core import Run

logger = logging.getLogger("t2i_distill")
VALIDATION_DIR = "validation"


@dataclass
class ValidationSampler:
    label: str  # row title, e.g. "sCM 2 steps"
    pipeline: object  # a FluxPipeline (subclass) sharing the run's modules
    call_kwargs: dict = field(default_factory=dict)  # num_inference_steps, guidance_scale, ...
    student: bool = True  # samples the student (so also its EMA, with --use_ema)
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around each call (a LoRA teacher view)


def read_validation_prompts(args: argparse.Namespace) -> list[str]:
    """--validation_prompt (repeatable) then the non-empty lines of --validation_prompts_file."""
    prompts = list(args.validation_prompt or [])
    if args.validation_prompts_file:
        path = Path(args.validation_prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--validation_prompts_file not found: {path}")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--validation_prompts_file {path} holds no prompt (one per non-empty line)")
    return prompts


def validation_samplers(run: "Run") -> list[ValidationSampler]:
    """The method's samplers, built once around the run's own (unwrapped) modules: no weights are copied."""
    from diffusers import FluxPipeline, SCMScheduler

    from model.pipeline import MeanFlowFluxPipeline, SCMFluxPipeline

    base = run.components
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                 text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
    student = getattr(run.unwrapped, "transformer", run.unwrapped)  # the FLUX transformer inside the method's view
    guidance = {} if run.args.validation_guidance_scale is None else {"guidance_scale": run.args.validation_guidance_scale}
    name = run.method.name
    if name == "sCM":
        pipe = SCMFluxPipeline(SCMScheduler(prediction_type="trigflow", sigma_data=run.args.sigma_data),
                               transformer=student, **parts)
        return [ValidationSampler(f"sCM {n} step{'s' * (n > 1)}", pipe, dict(num_inference_steps=n, **guidance))
                for n in (1, 2)]
    if name == "MeanFlow":
        pipe = MeanFlowFluxPipeline(MeanFlowFluxPipeline.default_scheduler(dict(base.scheduler.config)),
                                    transformer=student, **parts)
        return [ValidationSampler(f"MeanFlow {n} steps", pipe, dict(num_inference_steps=n, **guidance)) for n in (2, 4)]
    if name == "rescale":
        samplers = []
        teacher = _rescale_teacher_view(run, student)
        if teacher is not None:
            transformer, context = teacher
            samplers.append(ValidationSampler("teacher x1000, 28 steps", FluxPipeline(
                scheduler=base.scheduler, transformer=transformer, **parts), dict(num_inference_steps=28, **guidance),
                student=False, context=context))
        samplers.append(ValidationSampler("rescaled x1, 28 steps", FluxPipeline(
            scheduler=base.scheduler, transformer=student, **parts), dict(num_inference_steps=28, **guidance)))
        return samplers
    raise ValueError(f"--validation_prompt: no validation samplers are defined for the method {name!r}")


def _rescale_teacher_view(run: "Run", student: torch.nn.Module):
    """(transformer, context) that computes the ×1000 teacher of a rescale run, or None (flow_matching has none).

    A full run's teacher is its own frozen transformer.  A LoRA run's is :class:`~model.lora.TiedTeacher`: the
    student's transformer with the adapters off at ×1000, which ``teacher_mode`` gives the pipeline for the call.
    """
    from model.lora import TiedTeacher, teacher_mode

    if isinstance(run.teacher, TiedTeacher):
        tied = run.teacher
        return student, lambda: teacher_mode(student, tied.timestep_scale)
    if isinstance(run.teacher, torch.nn.Module) and hasattr(run.teacher, "config"):
        return run.teacher, contextlib.nullcontext
    return None


def image_grid(rows: list[list[np.ndarray]], labels: list[str]) -> Image.Image:
    """One row per sampler (its label in the left margin), images [H, W, 3] in [0, 1] left to right."""
    h, w = rows[0][0].shape[:2]
    texts = [label.replace(", ", "\n") for label in labels]  # "teacher x1000\n28 steps"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 8 + max(measure.multiline_textbbox((0, 0), text)[2] for text in texts)
    grid = Image.new("RGB", (margin + w * max(len(r) for r in rows), h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (images, text) in enumerate(zip(rows, texts)):
        draw.multiline_text((4, r * h + 4), text, fill="black")
        for c, image in enumerate(images):
            grid.paste(Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)), (margin + c * w, r * h))
    return grid


class Validation(Hook):
    """Every ``--validation_steps`` updates: sample the validation prompts, save and log a grid."""

    name = "validation"

    def __init__(self, prompts: list[str], every: int, num_images: int, resolution: int, seed: int):
        self.prompts, self.every, self.num_images = prompts, every, num_images
        self.resolution, self.seed = resolution, seed
        self.samplers: list[ValidationSampler] | None = None

    def on_update(self, run: "Run", update: Update) -> None:
        if update.step % self.every or not run.main:
            return
        path = Path(run.args.output_dir, VALIDATION_DIR, f"step_{update.step:07d}.png")
        grid = self.sample(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        grid.save(tmp, format="PNG")
        tmp.replace(path)
        run.log.event("validation", step=update.step, path=str(path))
        log_images(run.accelerator, "validation", np.asarray(grid), update.step)

    @torch.no_grad()
    def sample(self, run: "Run") -> Image.Image:
        from evaluation.generate import image_generators

        if self.samplers is None:
            self.samplers = validation_samplers(run)
        device = run.accelerator.device
        accelerator_rng = [device.index or 0] if device.type == "cuda" else []
        ema = next((h for h in run.hooks if isinstance(h, EMA) and h.shadow is not None), None)
        was_training = run.unwrapped.training
        run.unwrapped.eval()
        rows, labels = [], []
        try:
            with torch.random.fork_rng(devices=accelerator_rng), run.accelerator.autocast():
                for sampler in self.samplers:
                    rows.append(self._row(run, sampler, image_generators))
                    labels.append(sampler.label)
                if ema is not None:  # the same samplers on the average, weights restored afterwards
                    with ema.applied(run):
                        for sampler in (s for s in self.samplers if s.student):
                            rows.append(self._row(run, sampler, image_generators))
                            labels.append(f"EMA {sampler.label}")
        finally:
            run.unwrapped.train(was_training)
        return image_grid(rows, labels)

    def _row(self, run: "Run", sampler: ValidationSampler, image_generators) -> list[np.ndarray]:
        sampler.pipeline.set_progress_bar_config(disable=True)
        row = []
        for i, prompt in enumerate(self.prompts):
            generators = image_generators(self.seed, [(i, k) for k in range(self.num_images)])
            with sampler.context():
                images = sampler.pipeline(prompt=[prompt] * self.num_images, height=self.resolution,
                                          width=self.resolution, generator=generators, output_type="np",
                                          max_sequence_length=run.args.max_sequence_length,
                                          **sampler.call_kwargs).images
            row.extend(np.asarray(images, dtype=np.float32))
        return row
