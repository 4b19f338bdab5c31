"""Encode a dataset once: T5 + CLIP prompt embeddings and VAE latents into a conditioning cache.

    python -m data.encode_conditioning --pretrained_model_name_or_path Freepik/flux.1-lite-8B \\
        --dataset_name brivangl/midjourney-v6-llava --resolution 512 --output_dir work_dirs/cond512
    torchrun --nproc_per_node 8 -m data.encode_conditioning ...      # shards split over the ranks
    bash script/encode_conditioning.sh OUT RESOLUTION [flags]          # the same, GPUs detected

Then train with ``--conditioning_cache OUT`` (same ``--resolution``, ``--max_sequence_length``, crop and
flip flags): the trainers read the shards and never load the text encoders or the VAE.  The format is
described in :mod:`data.conditioning_cache`.  Re-running the command finishes an interrupted cache: every
shard is written under a temporary name and renamed when complete, and complete shards are skipped.
Each rank (``RANK``/``WORLD_SIZE`` from torchrun) encodes shards k with k mod WORLD_SIZE = RANK; no
collective communication is needed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from training.args import str2bool

logger = logging.getLogger("t2i_distill")
DEFAULT_DATASET = "brivangl/midjourney-v6-llava"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="FLUX pipeline (hub id or folder) whose text encoders and VAE encode the data; the trainer "
                        "must use the same one.")
    p.add_argument("--revision", default=None, help="Hub revision of the pipeline.")
    p.add_argument("--output_dir", required=True, help="The cache folder (created; an interrupted one is completed).")
    g = p.add_argument_group("data (the trainers' flags of the same names)")
    g.add_argument("--dataset_name", default=None, help=f"Hub dataset or local folder/file. Default: {DEFAULT_DATASET}.")
    g.add_argument("--data_files", nargs="+", default=None, help="Data files/globs (parquet, jsonl, csv, arrow).")
    g.add_argument("--data_dir", default=None, help="Local data directory (imagefolder or parquet shards).")
    g.add_argument("--image_column", default="image", help="Column holding the images.")
    g.add_argument("--caption_column", default="llava", help="Caption column (several, comma-separated: one drawn per sample).")
    g.add_argument("--cache_dir", default=None, help="Cache folder for hub downloads.")
    g.add_argument("--resolution", type=int, default=512, help="Training resolution; multiple of 16.")
    g.add_argument("--center_crop", type=str2bool, default=True, help="Centre crop (else seeded random crop).")
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the random crops/flips (the trainer's --seed).")
    g.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens per prompt.")
    g = p.add_argument_group("cache")
    g.add_argument("--variants", type=int, default=1,
                   help="Encodings per sample: variant v = the crop/flip/caption of training epoch v (epochs beyond "
                        "reuse variant epoch mod V). 1 is exact for centre crops without flips and one caption column.")
    g.add_argument("--shard_size", type=int, default=256, help="Samples per shard file.")
    g.add_argument("--batch_size", type=int, default=16, help="Samples per encoder call.")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="Text-encoder precision = the trainer's (it refuses another): bfloat16 for the DeepSpeed bf16 "
                        "scripts and --mixed_precision bf16, float16 for fp16, float32 for --mixed_precision no (the "
                        "VAE always runs in float32).")
    args = p.parse_args(argv)
    for name in ("variants", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.resolution <= 0 or args.resolution % 16:
        p.error(f"--resolution {args.resolution} must be a positive multiple of 16 (VAE /8, then 2x2 packing)")
    if args.dataset_name is None and args.data_files is None and args.data_dir is None:
        args.dataset_name = DEFAULT_DATASET
    return args


def cache_spec(args: argparse.Namespace, num_samples: int):
    from data.conditioning_cache import CacheSpec, pipeline_identity

    dataset = {k: getattr(args, k) for k in ("dataset_name", "data_files", "data_dir", "image_column", "caption_column")}
    pretrained = str(args.pretrained_model_name_or_path)
    return CacheSpec(pretrained, args.revision, args.resolution, args.max_sequence_length,
                     args.dtype, args.center_crop, args.random_flip, args.seed, args.variants, num_samples,
                     args.shard_size, dataset, identity=pipeline_identity(pretrained, args.revision))


def encode_shard(dataset, conditioner, indices: list[int], variants: int, batch_size: int, progress) -> tuple:
    """(tensors, bad reasons) of one shard: every sample in each variant (= training epoch)."""
    import torch

    valid = torch.ones(len(indices), dtype=torch.uint8)
    reasons: dict[int, str] = {}
    per_variant = []
    for v in range(variants):
        dataset.set_epoch(v)
        latents, embeds, pooled = [], [], []
        for start in range(0, len(indices), batch_size):
            rows = [dataset[i] for i in indices[start:start + batch_size]]
            for j, row in enumerate(rows):
                if "bad_reason" in row:
                    valid[start + j] = 0
                    reasons.setdefault(row["index"], row["bad_reason"])
            good = [r for r in rows if "bad_reason" not in r]
            if good:
                lat = conditioner.encode_images(torch.stack([r["pixel_values"] for r in good])).cpu()
                emb, pool, _ = conditioner.encode_prompts([r["caption"] for r in good])
                emb, pool = emb.to(conditioner.text_dtype).cpu(), pool.to(conditioner.text_dtype).cpu()
            j = 0
            for r in rows:  # unreadable rows become zeros below (never read: ``valid`` is 0)
                if "bad_reason" in r:
                    latents.append(None), embeds.append(None), pooled.append(None)
                else:
                    latents.append(lat[j]), embeds.append(emb[j]), pooled.append(pool[j])
                    j += 1
            progress.update(len(rows))
        per_variant.append([_fill_zeros(latents), _fill_zeros(embeds), _fill_zeros(pooled)])
    tensors = {"index": torch.tensor(indices, dtype=torch.int64), "valid": valid,
               "latents": torch.stack([p[0] for p in per_variant]), "prompt_embeds": torch.stack([p[1] for p in per_variant]),
               "pooled": torch.stack([p[2] for p in per_variant])}
    return tensors, reasons


def _fill_zeros(rows: list):
    """Stack per-sample tensors, zeros where a sample was unreadable."""
    import torch

    like = next((r for r in rows if r is not None), None)
    if like is None:
        raise ValueError("every sample of a shard is unreadable; check --image_column / --caption_column")
    return torch.stack([torch.zeros_like(like) if r is None else r for r in rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from data.conditioning_cache import (META_FILE, UNCOND_FILE, CacheSpec, save_shard, shard_is_complete, shard_name,
                                         spec_differences, write_atomic, write_json_atomic)
    from model.flux_io import FluxConditioner, check_resolution, load_flux_components
    from training.train_data import load_train_dataset

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    out = Path(args.output_dir)
    dataset = load_train_dataset(args)  # fails in seconds on a wrong column, before any encoder is loaded
    spec = cache_spec(args, len(dataset))
    if (out / META_FILE).is_file():
        diff = spec_differences(CacheSpec.read(out), spec)
        if diff:
            raise ValueError(f"{out} holds a cache encoded with other settings ({', '.join(diff)}); use another "
                             "--output_dir or the same flags")
    out.mkdir(parents=True, exist_ok=True)

    text_dtype = getattr(torch, args.dtype)
    pipe = load_flux_components(args.pretrained_model_name_or_path, revision=args.revision, dtype=text_dtype)
    pipe.vae.to(torch.float32)
    check_resolution(args.resolution, pipe.vae_scale_factor)
    conditioner = FluxConditioner(pipe, device, args.max_sequence_length)
    conditioner.text_dtype = text_dtype  # embeddings are stored as the encoders produced them
    if rank == 0:
        embeds, pooled, _ = conditioner.encode_prompts([" "])
        write_atomic(out / UNCOND_FILE, lambda tmp: save_file(
            {"prompt_embeds": embeds.to(text_dtype).cpu().contiguous(), "pooled": pooled.to(text_dtype).cpu().contiguous()},
            str(tmp)))
        write_json_atomic(out / META_FILE, spec.to_json())

    mine = [k for k in range(spec.num_shards) if k % world == rank]
    rows_of = lambda k: list(range(k * spec.shard_size, min((k + 1) * spec.shard_size, spec.num_samples)))  # noqa: E731
    todo = [k for k in mine if not shard_is_complete(out / shard_name(k), len(rows_of(k)))]
    logger.info("rank %d/%d: %d of its %d shards to encode (%d already complete)", rank, world, len(todo), len(mine),
                len(mine) - len(todo))
    total = sum(len(rows_of(k)) for k in todo) * args.variants
    with tqdm(total=total, desc=f"encoding (rank {rank})", unit="sample", disable=rank != 0 and world > 8) as progress:
        for k in todo:
            tensors, reasons = encode_shard(dataset, conditioner, rows_of(k), args.variants, args.batch_size, progress)
            save_shard(out / shard_name(k), tensors, reasons)
    if rank == 0:
        print(f"conditioning cache: {out} ({spec.num_samples} samples, {spec.num_shards} shards, {args.variants} "
              f"variant(s)); train with --conditioning_cache {out}")
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))
