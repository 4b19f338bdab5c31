"""Command-line flags shared by every trainer (sCM, MeanFlow, rescale); methods add their own."""
from __future__ import annotations

import argparse
import os

from model.attention import JVP_IMPLEMENTATIONS
from training.lora import add_lora_args, validate_lora_args


# The original release's training data: three parquet shards of this hub dataset (its train_*.py load exactly these).
RELEASE_DATASET = "brivangl/midjourney-v6-llava"
RELEASE_DATA_FILES = ("data/train_000.parquet", "data/train_001.parquet", "data/train_002.parquet")


def str2bool(value: str | bool) -> bool:
    """argparse type for the original scripts' ``--flag=True|False`` style."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def float_list(value: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}") from exc
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


def build_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="FLUX pipeline: hub id (e.g. Freepik/flux.1-lite-8B) or local folder with model_index.json.")
    g.add_argument("--revision", default=None, help="Hub revision of the pretrained pipeline.")
    g.add_argument("--rescaled_checkpoint_path", default=None,
                   help="Teacher weights adapted to time inputs in [0, 1]: .pt with a 'module' state dict, "
                        ".safetensors, or a diffusers folder (script/rescale_teacher.sh makes one). Loaded into "
                        "teacher and student. Required unless --timestep_scale 1000.")
    g.add_argument("--timestep_scale", type=float, default=1.0,
                   help="Factor applied to timestep and guidance before FLUX's sinusoidal embedding: 1 = rescaled "
                        "(the paper's choice), 1000 = stock FLUX.")
    g.add_argument("--jvp_attention", choices=JVP_IMPLEMENTATIONS, default="auto",
                   help="Forward-mode-AD attention used by the student during the JVP: 'auto' ('flash' on CUDA when "
                        "the optional jvp-flash-attention kernel is installed, else 'chunked'), 'flash' (that kernel, "
                        "error if unusable), 'chunked' (fused primal, "
                        "tangent in query chunks, O(chunk*N) memory) or 'math' (PyTorch's MATH SDPA, O(N^2)).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute transformer blocks in the backward pass of the student (the JVP pass is no-grad).")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="Hub dataset name or local folder/file (parquet, jsonl, imagefolder). "
                        f"Default (no --dataset_name/--data_files/--data_dir): {RELEASE_DATASET} with --data_files "
                        f"{' '.join(RELEASE_DATA_FILES)}, the original release's three shards.")
    g.add_argument("--data_files", nargs="+", default=None, help="Data files/globs (parquet, jsonl, csv, arrow).")
    g.add_argument("--data_dir", default=None, help="Local data directory (imagefolder or parquet shards).")
    g.add_argument("--image_column", default="image", help="Column holding the images.")
    g.add_argument("--caption_column", default="llava",
                   help="Column holding the captions; several separated by commas (e.g. 'llava,short') = one of "
                        "them per sample, drawn with a seed of (seed, epoch, sample) among those with text.")
    g.add_argument("--streaming", action="store_true",
                   help="Read the dataset as a stream (datasets IterableDataset: hub, parquet, jsonl/csv, webdataset "
                        ".tar) instead of loading it whole; rows are split by process (whole shards when their count "
                        "divides evenly) and a resumed run skips exactly the rows it had consumed.")
    g.add_argument("--streaming_shuffle_buffer", type=int, default=0,
                   help="With --streaming: shuffle shards and rows through a buffer of this many rows (seeded by "
                        "--seed and the epoch); 0 = stream order.")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Train on the first N rows of the dataset only (with or without --streaming).")
    g.add_argument("--resolution", type=int, default=512, help="Training resolution; multiple of 16 for FLUX.")
    g.add_argument("--center_crop", type=str2bool, default=True, help="Centre crop (else seeded random crop).")
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    g.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens per prompt.")
    g.add_argument("--conditioning_cache", default=None, metavar="DIR",
                   help="Train from precomputed T5/CLIP embeddings and VAE latents (python -m data.encode_conditioning): "
                        "the text encoders and the VAE are never loaded and the dataset flags are not read. Encode "
                        "it with this run's --resolution, --max_sequence_length, crop/flip flags and pipeline.")
    g.add_argument("--cache_dir", default=None, help="Cache folder for hub downloads.")
    g.add_argument("--max_bad_sample_fraction", type=float, default=0.01,
                   help="Unreadable samples (corrupt/empty image, empty caption) are skipped and logged to "
                        "logs/events.jsonl; the run saves and stops once the distinct unreadable samples found "
                        "exceed this fraction of the dataset.")

    add_lora_args(p)

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=8, help="Micro-batch per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--learning_rate", type=float, default=1e-5, help="AdamW learning rate.")
    g.add_argument("--lr_scheduler", default="constant",
                   choices=["constant", "constant_with_warmup", "linear", "cosine"], help="LR schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=500,
                   help="Warm-up steps of the LR schedule (as the original; 'constant' has no warm-up and ignores it).")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="Gradient clipping norm, applied as given, also under DeepSpeed (written into its config). "
                        "1.0 is what the original release's runs used: its scripts' 0.1 was ignored by DeepSpeed, "
                        "whose 'auto' clipping resolved to 1.0.")
    g.add_argument("--max_train_steps", type=int, default=10_000, help="Optimizer steps to train for.")
    g.add_argument("--seed", type=int, default=0, help="Random seed (0 is a seed like any other).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                   help="Autocast/weights precision; defaults to bf16 with --ds_file, else accelerate's setting.")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="Consecutive non-finite losses/gradients (each skipped) before the run saves and stops.")

    g = p.add_argument_group("distributed")
    g.add_argument("--ds_file", default=None,
                   help="DeepSpeed JSON config (e.g. parallel_config/deepspeed_bf16_batch8.json); its micro-batch, "
                        "accumulation and clipping are set from the flags above. Omit for plain accelerate (DDP).")

    g = p.add_argument_group("validation images")
    g.add_argument("--validation_prompt", action="append", default=None, metavar="TEXT",
                   help="A prompt to sample during training (repeatable). Grids go to OUT/validation/step_<step>.png and "
                        "the trackers: sCM at 1 and 2 steps, MeanFlow at 2 and 4, rescale teacher vs rescaled at 28.")
    g.add_argument("--validation_prompts_file", default=None, metavar="FILE",
                   help="More validation prompts, one per non-empty line (added after --validation_prompt).")
    g.add_argument("--validation_steps", type=int, default=500,
                   help="Sample the validation prompts every N applied updates (only with validation prompts).")
    g.add_argument("--num_validation_images", type=int, default=2, help="Images per validation prompt and sampler.")
    g.add_argument("--validation_resolution", type=int, default=None,
                   help="Height and width of the validation images; default --resolution.")
    g.add_argument("--validation_guidance_scale", type=float, default=None,
                   help="Guidance embedding scale of the validation samplers; default the sampling CLIs' "
                        "(sCM 4.5, MeanFlow 3.5, FLUX 3.5).")
    g.add_argument("--validation_seed", type=int, default=42,
                   help="Image k of validation prompt i uses the sampling CLIs' generator for (seed, i, k): the "
                        "same noise at every validation step, and the same images as test_*.py --seed.")

    g = p.add_argument_group("EMA of the student")
    g.add_argument("--use_ema", action="store_true",
                   help="Keep an exponential moving average of the student's trainable weights (float32, main process "
                        "only), checkpointed with the run and exported as ckpts/transformer_<step>_ema.pt beside the raw "
                        "weights; sample it with test_sCM.py/test_meanflow.py --use_ema.")
    g.add_argument("--ema_decay", type=float, default=0.9999,
                   help="beta of the EMA: avg <- beta*avg + (1 - beta)*weights after every applied update.")
    g.add_argument("--ema_power", type=float, default=None,
                   help="Power-function EMA (Karras et al. 2024) instead of --ema_decay: beta_n = (1 - 1/n)^(power + 1) "
                        "at update n, i.e. update k weighs ~ k^power; larger = shorter average. E.g. 6.94.")
    g.add_argument("--ema_device", choices=["accelerator", "cpu"], default="accelerator",
                   help="Where the float32 average lives: on the training device, or in host memory (slower, frees "
                        "4 bytes per trainable parameter of accelerator memory: 32 GB for an 8B student).")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="Run folder: ckpts/, checkpoints/, logs/ go here.")
    g.add_argument("--checkpointing_steps", type=int, default=1000,
                   help="Every N steps: full resumable state in checkpoints/ and ckpts/transformer_<step>.pt.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N full checkpoints.")
    g.add_argument("--exports_total_limit", type=int, default=None,
                   help="Keep only the newest N ckpts/transformer_<step>.pt exports (16 GB each for an 8B student).")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a checkpoints/checkpoint-<step> folder: continue that run exactly.")
    g.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"],
                   help="Trackers of the losses, norms, lr, samples/s and validation images: tensorboard (OUT/logs/), "
                        "wandb (run folder OUT/wandb/; offline with WANDB_MODE=offline), all, or none. "
                        "logs/metrics.jsonl is written in every case.")
    g.add_argument("--logging_steps", type=int, default=1, help="Log metrics every N steps.")
    return p


def validate_common_args(args: argparse.Namespace) -> None:
    """Fail before any output is written; messages say what is wrong and how to fix it."""
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise ValueError("--train_batch_size and --gradient_accumulation_steps must be >= 1")
    if args.resolution % 16:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 16 (VAE /8, then 2x2 latent packing)")
    if args.checkpointing_steps < 1 or args.max_train_steps < 1:
        raise ValueError("--checkpointing_steps and --max_train_steps must be >= 1")
    for name in ("checkpoints_total_limit", "exports_total_limit"):
        limit = getattr(args, name, None)
        if limit is not None and limit < 1:
            raise ValueError(f"--{name} {limit} must be >= 1; omit it to keep every one")
    if args.validation_prompts_file is not None and not os.path.isfile(args.validation_prompts_file):
        raise FileNotFoundError(f"--validation_prompts_file not found: {args.validation_prompts_file}")
    if args.validation_steps < 1 or args.num_validation_images < 1:
        raise ValueError("--validation_steps and --num_validation_images must be >= 1")
    if args.validation_resolution is not None and args.validation_resolution % 16:
        raise ValueError(f"--validation_resolution {args.validation_resolution} must be a multiple of 16")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay {args.ema_decay:g} must be in [0, 1) (e.g. 0.9999)")
    if args.ema_power is not None and args.ema_power < 0:
        raise ValueError(f"--ema_power {args.ema_power:g} must be >= 0 (0 = plain running mean of all updates)")
    if args.ema_power is not None and not args.use_ema:
        raise ValueError("--ema_power only applies with --use_ema; add --use_ema or drop --ema_power")
    if not 0.0 <= args.max_bad_sample_fraction <= 1.0:
        raise ValueError("--max_bad_sample_fraction must be in [0, 1]")
    if args.rescaled_checkpoint_path is not None and not os.path.exists(args.rescaled_checkpoint_path):
        raise FileNotFoundError(f"--rescaled_checkpoint_path {args.rescaled_checkpoint_path} does not exist. Create it "
                                "with script/rescale_teacher.sh, or omit it together with --timestep_scale 1000.")
    if args.rescaled_checkpoint_path is None and args.timestep_scale != 1000.0:
        raise ValueError("--timestep_scale {:g} needs --rescaled_checkpoint_path: stock FLUX weights expect time inputs "
                         "x1000. Make a rescaled teacher with script/rescale_teacher.sh, or pass --timestep_scale 1000."
                         .format(args.timestep_scale))
    if args.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--mixed_precision fp16 needs a CUDA GPU (fp16 autocast and its loss scaler are GPU "
                             "features); on CPU use --mixed_precision bf16 or no")
    if args.ds_file is not None and not os.path.exists(args.ds_file):
        raise FileNotFoundError(f"--ds_file {args.ds_file} does not exist (see parallel_config/)")
    if getattr(args, "max_train_samples", None) is not None and args.max_train_samples < 1:
        raise ValueError(f"--max_train_samples {args.max_train_samples} must be >= 1; omit it to use every row")
    if getattr(args, "streaming_shuffle_buffer", 0) < 0:
        raise ValueError(f"--streaming_shuffle_buffer {args.streaming_shuffle_buffer} must be >= 0 (0 = stream order)")
    if getattr(args, "streaming_shuffle_buffer", 0) and not args.streaming:
        raise ValueError("--streaming_shuffle_buffer only applies with --streaming (the map-style dataset is "
                         "shuffled by its sampler anyway)")
    validate_lora_args(args)
    if args.dataset_name is None and args.data_files is None and args.data_dir is None:
        args.dataset_name, args.data_files = RELEASE_DATASET, list(RELEASE_DATA_FILES)
