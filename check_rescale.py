"""How far is a rescaled teacher (time inputs in [0, 1]) from the original FLUX (inputs ×1000)?

    python check_rescale.py --pretrained_model_name_or_path PIPE --rescaled_checkpoint_path OUT/rescaled.pt \
        [--data_dir DATA] [--num_pairs 64] [--resolution 512] [--seeds 0 1 2 3] [--baseline] [--json report.json]

Two measurements, both with the same inputs for both models (each applies its own timestep_scale):
1. velocity gap on P held-out pairs z_t = (1 − t)·x₀ + t·ε: MSE = (1/P)·Σ‖v_R − v_O‖²/D and relative MSE =
   Σ‖v_R − v_O‖²/Σ‖v_O‖², overall and per quarter of t.  x₀ are VAE latents of dataset images (first
   ``num_pairs`` of a seeded permutation) or, without a dataset, standard-normal latents; ε is seeded;
   t_i = (i + ½)/P (stratified over (0, 1)); guidance ``--guidance``.  For a held-out measurement point the
   data flags at images the rescale run did not train on.
2. sample gap: diffusers' FluxPipeline, ``--num_inference_steps`` steps from the same seeded noise, with the
   transformer swapped (original vs rescaled); per seed the image MSE (pixels in [0, 1]) and PSNR.
``--baseline`` adds the un-adapted model (stock weights fed ×1 inputs, i.e. the rescale run's step 0), the
reference a useful rescaling must beat.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

FIGURE_PROMPTS = ("a photo of a bench", "a photo of a giraffe", "a photo of a cake and a zebra", "a photo of three buses")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="The original FLUX pipeline (hub id or folder): its transformer is the x1000 reference, "
                        "its text encoders/VAE/scheduler are used for both models.")
    p.add_argument("--revision", default=None, help="Hub revision of the pipeline.")
    p.add_argument("--rescaled_checkpoint_path", required=True,
                   help="The rescaled teacher: OUT/rescaled.pt, OUT/rescaled_transformer/, or any export with "
                        "timestep_scale 1 (as --rescaled_checkpoint_path of the trainers).")
    p.add_argument("--num_pairs", type=int, default=64, help="Number of held-out (x_t, t) pairs.")
    p.add_argument("--resolution", type=int, default=512, help="Image side in pixels (multiple of 16).")
    p.add_argument("--dataset_name", default=None, help="Dataset for x0 latents and captions (as the trainers).")
    p.add_argument("--data_files", nargs="+", default=None, help="Data files/globs (parquet, jsonl, csv, arrow).")
    p.add_argument("--data_dir", default=None, help="Local data directory (imagefolder or parquet shards).")
    p.add_argument("--image_column", default="image", help="Column holding the images.")
    p.add_argument("--caption_column", default="llava", help="Column holding the captions.")
    p.add_argument("--prompts", nargs="+", default=list(FIGURE_PROMPTS),
                   help="Prompts for the samples, and for the velocity pairs when no dataset is given "
                        "(default: the paper's Figure 1 prompts).")
    p.add_argument("--num_inference_steps", type=int, default=28, help="Sampling steps of the sample comparison.")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3],
                   help="One sample per seed (prompt i mod len(prompts)); pass --seeds with no value to skip.")
    p.add_argument("--guidance", type=float, default=3.5, help="Guidance-embedding scale for pairs and samples.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the pair selection and of the pair noise.")
    p.add_argument("--batch_size", type=int, default=8, help="Pairs per forward pass.")
    p.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens per prompt.")
    p.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="Model dtype; auto = bfloat16 on CUDA, float32 on CPU.")
    p.add_argument("--baseline", action="store_true",
                   help="Also measure the un-adapted model (stock weights with x1 inputs): the rescale run's step 0.")
    p.add_argument("--save_images", default=None, help="Folder for side-by-side PNGs (original | rescaled) per seed.")
    p.add_argument("--json", default=None, help="Write the report as JSON to this file.")
    args = p.parse_args(argv)
    if args.num_pairs < 1 or args.batch_size < 1 or args.num_inference_steps < 1:
        p.error("--num_pairs, --batch_size and --num_inference_steps must be >= 1")
    if args.resolution <= 0 or args.resolution % 16:
        p.error(f"--resolution {args.resolution} must be a positive multiple of 16 (VAE /8, then 2x2 packing)")
    if not os.path.exists(args.rescaled_checkpoint_path):
        p.error(f"--rescaled_checkpoint_path {args.rescaled_checkpoint_path} does not exist; make one with "
                "script/rescale_teacher.sh")
    if args.json and not os.access(Path(args.json).absolute().parent, os.W_OK):
        p.error(f"--json {args.json}: its folder does not exist or is not writable")
    return args


def _device_dtype(args):
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def build_pairs(args, conditioner, in_channels: int, has_guidance: bool):
    """Fixed held-out pairs (see module docstring); returns (VelocityPairs, description dict)."""
    import torch

    from training.rescale import VelocityPairs

    g = torch.Generator().manual_seed(args.seed)
    n = args.num_pairs
    has_data = any(v is not None for v in (args.dataset_name, args.data_files, args.data_dir))
    if has_data:
        from data.dataset import Text2ImageDataset, load_hf_dataset

        ds = Text2ImageDataset(load_hf_dataset(args.dataset_name, args.data_files, args.data_dir),
                               args.resolution, args.image_column, args.caption_column)
        order = torch.randperm(len(ds), generator=g).tolist()
        good = []
        for index in order:
            item = ds[index]
            if "bad_reason" not in item:
                good.append(item)
            if len(good) == n:
                break
        if not good:
            raise ValueError("no readable image-caption pair in the dataset")
        items = [good[i % len(good)] for i in range(n)]  # fewer images than pairs: reuse with other (ε, t)
        x0, captions = [], []
        for start in range(0, n, args.batch_size):
            chunk = items[start:start + args.batch_size]
            x0.append(conditioner.encode_images(torch.stack([s["pixel_values"] for s in chunk])).cpu())
            captions += [s["caption"] for s in chunk]
        x0 = torch.cat(x0)
        source = {"source": "dataset", "distinct_images": len(good)}
    else:
        side = args.resolution // conditioner.vae_scale_factor // 2
        x0 = torch.randn(n, side * side, in_channels, generator=g)
        captions = [args.prompts[i % len(args.prompts)] for i in range(n)]
        source = {"source": "random_latents (standard normal)"}
    embeds, pooled = [], []
    for start in range(0, n, args.batch_size):
        e, p, text_ids = conditioner.encode_prompts(captions[start:start + args.batch_size])
        embeds.append(e.cpu())
        pooled.append(p.cpu())
    from model.trigflow import FluxInputs

    guidance = torch.full((n,), args.guidance) if has_guidance else None
    inputs = FluxInputs(torch.cat(embeds), torch.cat(pooled), text_ids.cpu(),
                        conditioner.image_ids(args.resolution, args.resolution).cpu(), guidance)
    noise = torch.randn(x0.shape, generator=g)
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    pairs = VelocityPairs.from_latents(x0, noise, t.float(), inputs)
    return pairs, {**source, "num_pairs": n, "guidance": args.guidance if has_guidance else None,
                   "seed": args.seed, "t": "stratified (i + 0.5)/P"}


def generate(pipe, transformer, args, seed: int, prompt: str):
    """One FluxPipeline sample (pixels in [0, 1], [3, H, W], float32 CPU) with ``transformer`` swapped in."""
    import torch
    from diffusers import FluxPipeline

    sampler = FluxPipeline(**{**pipe.components, "transformer": transformer})
    sampler.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    image = sampler(prompt, height=args.resolution, width=args.resolution, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance, generator=generator, output_type="pt",
                    max_sequence_length=args.max_sequence_length).images[0]
    return image.float().cpu()


def image_gap(a, b) -> dict:
    """MSE of two images in [0, 1], PSNR = 10·log10(1/MSE) dB, and the largest absolute difference."""
    mse = float((a - b).square().mean())
    return {"image_mse": mse, "psnr_db": math.inf if mse == 0 else 10 * math.log10(1.0 / mse),
            "max_abs": float((a - b).abs().max())}


def run_check(args: argparse.Namespace) -> dict:
    """Measure the rescaled (and optionally the un-adapted) model against the original; returns the report."""
    import torch
    from tqdm.auto import tqdm

    from model.flux_io import FluxConditioner, check_resolution, load_flux_components
    from model.loading import load_flux_transformer, load_transformer_weights
    from model.transformer import STOCK_TIMESTEP_SCALE
    from training.rescale import RESCALED_TIMESTEP_SCALE, has_guidance_embedding, velocity_gap

    device, dtype = _device_dtype(args)
    pipe = load_flux_components(args.pretrained_model_name_or_path, revision=args.revision, dtype=dtype)
    check_resolution(args.resolution, pipe.vae_scale_factor)
    conditioner = FluxConditioner(pipe, device, args.max_sequence_length)
    load = lambda scale: load_flux_transformer(args.pretrained_model_name_or_path, scale, revision=args.revision,
                                               dtype=dtype).eval().requires_grad_(False)

    def load_rescaled():
        model = load(RESCALED_TIMESTEP_SCALE)
        load_transformer_weights(model, args.rescaled_checkpoint_path)  # refuses x1000 checkpoints
        if model.config.interval_embedding:
            raise ValueError(f"{args.rescaled_checkpoint_path} has an interval (t - r) embedding: it is a MeanFlow "
                             "student, not a rescaled teacher")
        return model.to(device)

    original = load(STOCK_TIMESTEP_SCALE).to(device)
    pairs, pair_info = build_pairs(args, conditioner, original.config.in_channels, has_guidance_embedding(original))
    candidates = [("rescaled", load_rescaled)] + ([("baseline", lambda: load(RESCALED_TIMESTEP_SCALE).to(device))]
                                                  if args.baseline else [])
    jobs = [(seed, args.prompts[i % len(args.prompts)]) for i, seed in enumerate(args.seeds)]
    progress = tqdm(total=len(jobs) * (1 + len(candidates)), desc="samples", disable=not jobs)
    reference = {}
    for seed, prompt in jobs:
        reference[seed] = generate(pipe, original, args, seed, prompt)
        progress.update(1)
    report = {"pretrained_model_name_or_path": args.pretrained_model_name_or_path,
              "rescaled_checkpoint_path": args.rescaled_checkpoint_path, "device": str(device), "dtype": str(dtype),
              "resolution": args.resolution, "pairs": pair_info,
              "samples": {"num_inference_steps": args.num_inference_steps, "guidance": args.guidance,
                          "seeds": list(args.seeds)},
              "models": {}}
    for name, loader in candidates:
        model = loader()
        entry = {"velocity": velocity_gap(original, model, pairs, args.batch_size), "samples": []}
        for seed, prompt in jobs:
            image = generate(pipe, model, args, seed, prompt)
            entry["samples"].append({"seed": seed, "prompt": prompt, **image_gap(image, reference[seed])})
            if args.save_images and name == "rescaled":
                _save_pair(Path(args.save_images), seed, reference[seed], image)
            progress.update(1)
        if entry["samples"]:
            entry["mean_image_mse"] = sum(s["image_mse"] for s in entry["samples"]) / len(entry["samples"])
        report["models"][name] = entry
        del model
    progress.close()
    return report


def _save_pair(folder: Path, seed: int, left, right) -> None:
    import numpy as np
    import torch
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    both = torch.cat([left, torch.ones_like(left[..., :4]), right], dim=-1)  # white 4-px separator
    array = (both.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    final = folder / f"seed{seed:04d}_original_vs_rescaled.png"
    tmp = folder / f".{final.name}.tmp.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, final)


def format_report(report: dict) -> str:
    models = report["models"]
    pi = report["pairs"]
    lines = [f"original (x1000): {report['pretrained_model_name_or_path']}",
             f"rescaled (x1):    {report['rescaled_checkpoint_path']}",
             "",
             f"velocity gap on {pi['num_pairs']} (x_t, t) pairs — {pi['source']}, t {pi['t']}, guidance {pi['guidance']}, "
             f"{report['resolution']}px"]
    first = next(iter(models.values()))["velocity"]
    bins = [f"t[{b['t_low']:.2f},{b['t_high']:.2f})" for b in first["mse_by_t"]]
    lines.append(f"{'model':<10} {'MSE':>11} {'rel. MSE':>11} " + " ".join(f"{b:>15}" for b in bins))
    for name, entry in models.items():
        v = entry["velocity"]
        lines.append(f"{name:<10} {v['mse']:>11.4e} {v['rel_mse']:>11.4e} "
                     + " ".join(f"{b['mse']:>15.4e}" for b in v["mse_by_t"]))
    lines.append(f"(mean ‖v_original‖²/D = {first['mean_sq_norm_original']:.4e})")
    if report["samples"]["seeds"]:
        s = report["samples"]
        lines += ["", f"{s['num_inference_steps']}-step samples, guidance {s['guidance']}: image MSE (pixels in [0,1]) "
                      "and PSNR vs the original"]
        names = list(models)
        lines.append(f"{'seed':>5}  {'prompt':<32} " + " ".join(f"{n + ' MSE':>14} {'PSNR dB':>8}" for n in names))
        for i, seed in enumerate(s["seeds"]):
            prompt = models[names[0]]["samples"][i]["prompt"][:32]
            cells = " ".join(f"{models[n]['samples'][i]['image_mse']:>14.4e} {models[n]['samples'][i]['psnr_db']:>8.2f}"
                             for n in names)
            lines.append(f"{seed:>5}  {prompt:<32} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run_check(args)
    print(format_report(report))
    if args.json:
        from training.checkpointing import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=2, default=str) + "\n")
        print(f"report written to {args.json}")
    return report


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))
