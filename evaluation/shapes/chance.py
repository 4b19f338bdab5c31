"""The shapes scorer's chance floor: what images that know nothing about the prompt score.

Two references, on the benchmark's own held-out prompts, seeds and image count:

* **untrained model**: the teacher pipeline (same VAE, text encoders, scheduler) with a randomly
  initialised transformer of the same architecture, sampled by the real teacher CLI
  (``test_flux8b.py`` code path) at the reference NFE and guidance;
* **uniform noise**: every pixel uniform in [0, 255], from the image's own seed.

The floor of each task (and of the overall score) is the higher of the two.  A blob of the right
colour in the middle of the image already passes some single-object and colour prompts, so a score
at or below this floor means the model has learnt nothing the scorer can see.

``python -m evaluation.shapes.chance --output docs/toy_benchmark/chance.json`` measures it for the full
benchmark's settings (the committed figure); the benchmark measures it for its own settings.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

def _noise_folder(folder: Path, metadata: Sequence[dict], n_samples: int, seed: int, resolution: int) -> Path:
    """Uniform-noise images in GenEval layout; image k of prompt i is seeded by (seed, i, k) as every sampler's."""
    from PIL import Image

    from evaluation.generate import image_seed, save_png_atomic
    from evaluation.geneval_layout import write_prompt_metadata

    for i, row in enumerate(metadata):
        write_prompt_metadata(folder, i, row)  # also creates samples/
        for k in range(n_samples):
            rng = np.random.default_rng(image_seed(seed, i, k))
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            save_png_atomic(Image.fromarray(pixels), folder / f"{i:05d}" / "samples" / f"{k:04d}.png")
    return folder


def _untrained_transformer(teacher_dir: Path, path: Path, seed: int) -> Path:
    """An export (``{'module', 'config', 'step'}``) of a randomly initialised transformer shaped like the teacher's."""
    import torch

    from model.pipeline import _transformer_config
    from model.transformer import DistillFluxTransformer2DModel
    from training.checkpointing import export_transformer

    config = {k: v for k, v in _transformer_config(str(teacher_dir), None).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    model = DistillFluxTransformer2DModel.from_config(config)
    export_transformer(path, model.state_dict(), dict(model.config), 0)
    return path


def measure_chance(work_dir: Path, teacher_dir: Path, metadata_file: Path, *, n_samples: int, sample_seed: int,
                   resolution: int, guidance_scale: float, nfe: int, max_sequence_length: int) -> dict:
    """Score untrained-model and noise samples; returns ``{"untrained_model", "noise", "floor", "settings"}``.

    Each score is ``{"overall", "tasks": {tag: fraction}, ...}`` as the benchmark's rows; ``floor`` is the
    per-task (and overall) maximum of the two.
    """
    from evaluation.geneval_layout import read_metadata
    from evaluation.shapes.benchmark import score_samples
    from model.sampling_cli import main as sample

    work_dir, metadata = Path(work_dir), read_metadata(metadata_file)
    work_dir.mkdir(parents=True, exist_ok=True)
    weights = _untrained_transformer(Path(teacher_dir), work_dir / "untrained_transformer.pt", sample_seed)
    model_dir = work_dir / "untrained_model"
    sample("teacher", ["--pretrained_model_name_or_path", str(teacher_dir), "--resume_path", str(weights),
                       "--resolution", str(resolution), "--num_inference_steps", str(nfe),
                       "--guidance_scale", str(guidance_scale), "--max_sequence_length", str(max_sequence_length),
                       "--seed", str(sample_seed), "--metadata_file", str(metadata_file), "--n_samples",
                       str(n_samples), "--output_dir", str(model_dir), "--no_progress"])
    noise_dir = _noise_folder(work_dir / "noise", metadata, n_samples, sample_seed, resolution)
    scores = {"untrained_model": score_samples(model_dir, metadata, n_samples),
              "noise": score_samples(noise_dir, metadata, n_samples)}
    tags = sorted(set(scores["untrained_model"]["tasks"]) | set(scores["noise"]["tasks"]))
    floor = {"tasks": {t: max(s["tasks"].get(t, 0.0) for s in scores.values()) for t in tags},
             "overall": max(s["overall"] for s in scores.values())}
    settings = dict(prompts=len(metadata), n_samples=n_samples, images=len(metadata) * n_samples,
                    sample_seed=sample_seed, resolution=resolution, guidance_scale=guidance_scale, nfe=nfe)
    return {**scores, "floor": floor, "settings": settings}


def chance_row(chance: dict) -> dict:
    """The floor as a table row (``model`` = "chance", ``nfe`` = the NFE the untrained model was sampled at)."""
    return {"model": "chance", "nfe": chance["settings"]["nfe"], "overall": chance["floor"]["overall"],
            "tasks": dict(chance["floor"]["tasks"])}


def below_chance(row: dict, chance: Optional[dict]) -> bool:
    """True when a result does not beat the floor (ties count: they show nothing either)."""
    return chance is not None and row.get("model") != "chance" and row["overall"] <= chance["floor"]["overall"]


def main(argv: Optional[list[str]] = None) -> int:
    from evaluation.shapes.benchmark import DEFAULT_TEACHER_DIR, BenchmarkConfig
    from evaluation.shapes.domain import make_heldout_metadata
    from evaluation.shapes.teacher import read_build_info

    d = BenchmarkConfig()
    p = argparse.ArgumentParser(prog="python -m evaluation.shapes.chance", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", required=True, help="JSON file to write (e.g. docs/toy_benchmark/chance.json)")
    p.add_argument("--work_dir", default=None, help="folder for the samples (default: beside --output, removed after)")
    p.add_argument("--teacher_dir", default=str(DEFAULT_TEACHER_DIR), help="shapes teacher pipeline folder")
    p.add_argument("--heldout_prompts_per_tag", type=int, default=d.heldout_prompts_per_tag,
                   help="held-out prompts per task (the benchmark's)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the held-out prompts (the benchmark's --seed)")
    p.add_argument("--sample_seed", type=int, default=d.sample_seed, help="sampling seed (the benchmark's)")
    p.add_argument("--n_samples", type=int, default=d.n_samples, help="images per prompt")
    p.add_argument("--resolution", type=int, default=d.resolution, help="image side in pixels")
    p.add_argument("--guidance_scale", type=float, default=d.guidance_scale, help="guidance of the untrained model")
    p.add_argument("--nfe", type=int, default=d.reference_nfe, help="Euler steps of the untrained model")
    args = p.parse_args(argv)
    import shutil
    import tempfile

    output = Path(args.output)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix=".chance-", dir=output.parent))
    try:
        metadata_file = work / "heldout_metadata.jsonl"
        make_heldout_metadata(metadata_file, args.heldout_prompts_per_tag, args.seed)
        seq_len = int((read_build_info(args.teacher_dir) or {}).get("config", {}).get("max_sequence_length", 16))
        chance = measure_chance(work, Path(args.teacher_dir), metadata_file, n_samples=args.n_samples,
                                sample_seed=args.sample_seed, resolution=args.resolution,
                                guidance_scale=args.guidance_scale, nfe=args.nfe, max_sequence_length=seq_len)
        from evaluation.shapes.benchmark import teacher_fingerprint

        chance["settings"].update(heldout_prompts_per_tag=args.heldout_prompts_per_tag, seed=args.seed,
                                  teacher_fingerprint=teacher_fingerprint(args.teacher_dir))
        output.write_text(json.dumps(chance, indent=2) + "\n", encoding="utf-8")
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"chance floor: overall {100 * chance['floor']['overall']:.1f} (untrained model "
          f"{100 * chance['untrained_model']['overall']:.1f}, uniform noise {100 * chance['noise']['overall']:.1f}) "
          f"over {chance['settings']['images']} images -> {output}")
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))
