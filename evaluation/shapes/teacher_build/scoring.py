"""Sampling and scoring a shapes teacher for its build report (the benchmark samples through the test_*.py CLIs)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from evaluation.shapes.teacher_build.common import PathLike, progress_bar
from evaluation.shapes.teacher_build.recipes import TeacherConfig


def sample_to_folder(pipe, metadata: Sequence[dict], root: PathLike, n_samples: int = 2, num_inference_steps: int = 28,
                     guidance_scale: float = 3.5, seed: int = 0, batch_size: int = 16, max_sequence_length: int = 16,
                     resolution: int = 64, progress: bool = True) -> Path:
    """Sample a ``FluxPipeline`` into a GenEval-layout folder: ``root/<i:05d>/samples/<k:04d>.png``.

    Image (i, k) starts from the noise of :func:`evaluation.generate.image_generators` (seed, i, k), as
    in the sampling CLIs, so it does not depend on the batch size or on the other prompts.
    """
    import torch

    from evaluation.generate import image_generators
    from evaluation.geneval_layout import sample_path, write_prompt_metadata

    root = Path(root)
    jobs = [(i, k) for i in range(len(metadata)) for k in range(n_samples)]
    for i, spec in enumerate(metadata):
        write_prompt_metadata(root, i, spec)
    bar = progress_bar(len(jobs), f"sampling {num_inference_steps} steps", progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        generators = image_generators(seed, chunk)
        with torch.no_grad():
            images = pipe(prompt=[metadata[i]["prompt"] for i, _ in chunk], height=resolution, width=resolution,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          generator=generators, max_sequence_length=max_sequence_length, output_type="pil").images
        for (i, k), image in zip(chunk, images):
            image.save(sample_path(root, i, k))
        bar.update(len(chunk))
    bar.close()
    return root


def score_pipeline(pipe, config: TeacherConfig, work_dir: PathLike, progress: bool = True) -> dict:
    """Sample the held-out prompts at ``eval_steps`` and return the GenEval summary (fractions)."""
    from evaluation.shapes.domain import heldout_specs
    from evaluation.shapes.scorer import score_folder
    from evaluation.summarize_geneval import summarize_rows

    specs = heldout_specs(config.eval_prompts_per_tag, config.seed)
    folder = Path(work_dir) / f"samples_{config.eval_steps}steps"
    pipe.set_progress_bar_config(disable=True)
    sample_to_folder(pipe, specs, folder, config.eval_samples, config.eval_steps, config.eval_guidance, config.seed,
                     config.eval_batch_size, config.max_sequence_length, config.resolution, progress)
    rows = score_folder(folder)
    summary = summarize_rows(rows, specs)
    return {k: summary[k] for k in ("overall", "tasks", "total_images", "correct_images")}


def evaluate_stored(folder: Path, config: TeacherConfig, work_dir: Path, progress: bool) -> dict:
    """Score the teacher saved in ``folder`` as it will be loaded (float32), at ``eval_guidance`` and, for a
    guidance-distilled teacher, also at guidance input 1 (what the distillation adds)."""
    import torch
    from diffusers import FluxPipeline

    stored = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    evaluation = score_pipeline(stored, config, work_dir / "eval", progress)
    evaluation.update({"steps": config.eval_steps, "guidance": config.eval_guidance,
                       "samples_per_prompt": config.eval_samples})
    if config.distill_steps:
        # the same images with the guidance input at 1 (no guidance): what the distillation adds
        plain = score_pipeline(stored, replace(config, eval_guidance=1.0), work_dir / "eval_guidance_1", progress)
        evaluation["at_guidance_1"] = {"overall": plain["overall"],
                                       "tasks": {k: v["accuracy"] for k, v in plain["tasks"].items()}}
    return evaluation
