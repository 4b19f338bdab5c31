"""The sampling command line shared by ``test_sCM.py``, ``test_meanflow.py`` and ``test_flux8b.py``.

Each script is ``sys.exit(cli("<method>"))``.  The flow is: parse and validate flags → read the
prompts → cheap checks (checkpoint exists, resolution fits the VAE) → load the pipeline (checkpoint
errors) → only then create the output folder and generate (``evaluation.generate.generate_folder``).
Bad input therefore exits with one line on stderr, status 2, and no output folder.

Multi-GPU: ``torchrun --nproc_per_node N test_sCM.py ...`` — each process reads RANK/WORLD_SIZE/
LOCAL_RANK, takes every N-th group of prompts and uses GPU LOCAL_RANK; no process group is created.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METADATA = REPO_ROOT / "evaluation" / "evaluation_metadata.jsonl"
DEFAULT_MODEL = "Freepik/flux.1-lite-8B"

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "scm": dict(steps=2, guidance=4.5, title="Sample an sCM (TrigFlow consistency) FLUX student into a GenEval folder."),
    "meanflow": dict(steps=4, guidance=3.5, title="Sample a MeanFlow FLUX student into a GenEval folder."),
    "teacher": dict(steps=28, guidance=3.5, title="Sample the FLUX teacher (diffusers' FluxPipeline) into a GenEval folder."),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_parser(method: str) -> argparse.ArgumentParser:
    d = METHOD_DEFAULTS[method]
    p = argparse.ArgumentParser(description=d["title"], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL,
                   help="FLUX pipeline (hub id or folder) providing VAE, text encoders, tokenizers and scheduler"
                        + (" and the transformer." if method == "teacher" else
                           "; also the transformer config for checkpoints in the original {'module': ...} format."))
    m.add_argument("--revision", default=None, help="Hub revision of --pretrained_model_name_or_path.")
    m.add_argument("--resume_path", default=None, required=method != "teacher",
                   help=("Student to sample: a training export ckpts/transformer_<step>.pt ({'module', 'config', 'step'} "
                         "or the original {'module'}), a .safetensors file, a transformer folder, a LoRA export folder "
                         "ckpts/lora_<step>/ (applied to the base it was trained on), or a pipeline folder written by "
                         "export_diffusers.py (then its own components are used)." if method != "teacher" else
                         "Optional teacher weights replacing the pipeline's transformer (e.g. a rescaled x1 teacher .pt)."))
    if method != "teacher":
        m.add_argument("--use_ema", action="store_true",
                       help="Sample the EMA weights that training with --use_ema wrote beside the --resume_path export: "
                            "ckpts/transformer_<step>_ema.pt, or for a LoRA student ckpts/lora_<step>_ema/ (the "
                            "averaged adapter and heads, on the same base).")
    m.add_argument("--timestep_scale", type=float, default=None,
                   help="Factor on time/guidance inputs of the transformer (1000 = stock FLUX, 1 = rescaled). Default: "
                        "the checkpoint's own config; 1 for original-release .pt files without one"
                        + ("; the pipeline's config without --resume_path." if method == "teacher" else "."))
    if method != "teacher":
        m.add_argument("--lora_base", default=None,
                       help="For a LoRA --resume_path: the weights its adapter was trained on (the run's "
                            "--rescaled_checkpoint_path). Default: the path recorded in its lora_info.json.")
    m.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="Weights dtype: auto = bf16 on GPU, fp32 on CPU.")
    m.add_argument("--device", default="auto", help="auto = cuda:LOCAL_RANK when CUDA is available, else cpu.")
    m.add_argument("--ds_file", default=None, help="Accepted for compatibility with the original scripts and ignored "
                                                 "(sampling uses no DeepSpeed).")
    m.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)

    s = p.add_argument_group("sampling")
    s.add_argument("--resolution", type=int, default=512, help="Image height and width in pixels (multiple of 16 for FLUX).")
    s.add_argument("--num_inference_steps", type=int, default=d["steps"], help="Sampling steps = transformer calls per image (NFE).")
    s.add_argument("--guidance_scale", type=float, default=d["guidance"], help="Distilled guidance, fed to the guidance embedding.")
    s.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens per prompt (1..512).")
    s.add_argument("--seed", type=int, default=42,
                   help="Base seed; image k of prompt i uses its own generator seeded from (seed, i, k). 0 is an ordinary seed.")
    if method == "scm":
        s.add_argument("--max_timestep", type=float, default=None, help="TrigFlow start time t0 (default 1.5708 ~ pi/2).")
        s.add_argument("--intermediate_timestep", type=float, default=None,
                       help="Middle time of the 2-step grid (default 1.3); N != 2 steps use linspace(t0, 0, N + 1).")
        s.add_argument("--sigma_data", type=float, default=0.5, help="TrigFlow sigma_d used in training.")
    if method == "meanflow":
        s.add_argument("--time_schedule", choices=["flux", "uniform"], default="flux",
                       help="flux: FLUX's resolution-shifted sigmas + 0 (the original); uniform: linspace(1, 0, N + 1).")

    o = p.add_argument_group("prompts and output")
    o.add_argument("--output_dir", required=True,
                   help="GenEval folder to fill: OUT/<index:05d>/metadata.jsonl and OUT/<index:05d>/samples/<k:04d>.png.")
    src = o.add_mutually_exclusive_group()
    src.add_argument("--metadata_file", default=None,
                     help=f"GenEval metadata jsonl (one prompt spec per line). Default: {DEFAULT_METADATA.relative_to(REPO_ROOT)}.")
    src.add_argument("--prompts", default=None, metavar="FILE", help="Ad-hoc prompts, one per non-empty line.")
    src.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="An ad-hoc prompt (repeatable).")
    o.add_argument("--allow_empty_prompt", action="store_true",
                   help="Accept empty prompts (unconditional samples); without it an empty prompt is an error.")
    o.add_argument("--n_samples", type=int, default=4, help="Images per prompt.")
    o.add_argument("--batch_size", type=int, default=4,
                   help="Images per pipeline call; best a multiple or divisor of --n_samples.")
    o.add_argument("--max_prompts", type=int, default=None, help="Only the first N prompts (smoke tests).")
    o.add_argument("--grid", action="store_true", help="Also write OUT/<index>/grid.png with the prompt's samples.")
    o.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return p


def parse_args(method: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser(method)
    args = p.parse_args(argv)
    checks = [
        (args.num_inference_steps >= 1, f"--num_inference_steps must be >= 1, got {args.num_inference_steps}"),
        (args.resolution > 0, f"--resolution must be > 0, got {args.resolution}"),
        (1 <= args.max_sequence_length <= 512, f"--max_sequence_length must be in 1..512, got {args.max_sequence_length}"),
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.n_samples >= 1 and args.batch_size >= 1, "--n_samples and --batch_size must be >= 1"),
        (args.max_prompts is None or args.max_prompts >= 1, "--max_prompts must be >= 1"),
        (args.timestep_scale is None or args.timestep_scale > 0, "--timestep_scale must be > 0"),
        (math.isfinite(args.guidance_scale), f"--guidance_scale must be a finite number, got {args.guidance_scale}"),
    ]
    if method == "scm":
        checks.append((args.sigma_data > 0, "--sigma_data must be > 0"))
        if args.num_inference_steps != 2 and args.intermediate_timestep is not None:
            checks.append((False, "--intermediate_timestep only applies to --num_inference_steps 2"))
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


def load_rows(args: argparse.Namespace) -> list[dict]:
    """Prompt rows: GenEval metadata lines, or {"prompt": text} for ad-hoc prompts."""
    from evaluation.geneval_layout import read_metadata

    if args.prompt:
        rows = [{"prompt": text} for text in args.prompt]
    elif args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts file not found: {path}")
        rows = [{"prompt": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        path = Path(args.metadata_file) if args.metadata_file else DEFAULT_METADATA
        if not path.is_file():
            raise FileNotFoundError(f"--metadata_file not found: {path}")
        rows = read_metadata(path)
    if not rows:
        raise ValueError("no prompts to sample (empty prompt file?)")
    rows = rows[:args.max_prompts] if args.max_prompts else rows
    empty = [i for i, row in enumerate(rows) if not str(row.get("prompt", "")).strip()]
    if empty and not args.allow_empty_prompt:
        raise ValueError(f"prompt {empty[0]} is empty ({len(empty)} empty of {len(rows)}); pass --allow_empty_prompt "
                         "for unconditional samples, or give the text")
    return rows


def _training_run_config(resume_path: str | None) -> tuple[dict, Path] | None:
    """The run config of the training run that wrote ``OUT/ckpts/transformer_<step>.pt`` or ``OUT/ckpts/lora_<step>/``
    (None if not found).

    Prefers ``OUT/checkpoints/checkpoint-<step>/run_config.json``, else the newest checkpoint of that run
    (the guidance flags cannot change on resume).
    """
    if resume_path is None or not Path(resume_path).exists() or Path(resume_path).parent.name != "ckpts":
        return None
    checkpoints = Path(resume_path).parent.parent / "checkpoints"
    found = re.search(r"_(\d+)(?:_ema)?$", Path(resume_path).stem)  # transformer_<step>[_ema].pt, lora_<step>[_ema]/
    step = found.group(1) if found else ""
    candidates = [checkpoints / f"checkpoint-{step}"] + sorted(
        checkpoints.glob("checkpoint-*"), key=lambda d: int(d.name.rpartition("-")[2]) if
        d.name.rpartition("-")[2].isdigit() else -1, reverse=True)
    for folder in candidates:
        config_file = folder / "run_config.json"
        try:
            return json.loads(config_file.read_text()), config_file
        except (OSError, ValueError):
            continue
    return None


def _flat_numbers(value) -> list[float]:
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _flat_numbers(item)]
    return [float(value)]


def trained_guidance_range(run_config: dict) -> tuple[float, float] | None:
    """[min, max] of the guidance-embedding scales a training run drew (sCM, MeanFlow, rescale)."""
    method = run_config.get("method")
    if method == "sCM":
        scales = _flat_numbers(run_config.get("scm_cfg_scale") or [4.0, 4.5, 5.0])
    elif method == "MeanFlow":
        scales = _flat_numbers(run_config.get("cfg_scale") or [4.0, 4.5, 5.0])  # None = the trainer's default
    elif method == "rescale" and "guidance_min" in run_config:
        scales = [float(run_config["guidance_min"]), float(run_config["guidance_max"])]
    else:
        return None
    return min(scales), max(scales)


def warn_guidance_range(args: argparse.Namespace) -> str | None:
    """One warning when --guidance_scale lies outside what the checkpoint was trained on; returns it."""
    found = _training_run_config(args.resume_path)
    trained = trained_guidance_range(found[0]) if found else None
    g = args.guidance_scale
    if trained is not None and not trained[0] <= g <= trained[1]:
        message = (f"warning: --guidance_scale {g:g} is outside the guidance range this checkpoint was trained on "
                   f"[{trained[0]:g}, {trained[1]:g}] ({found[1]}); the images are an extrapolation")
    elif trained is None and g < 0:
        message = f"warning: --guidance_scale {g:g} is negative; FLUX's guidance embedding is trained on positive scales"
    else:
        return None
    print(message, file=sys.stderr, flush=True)
    return message


def ema_export_of(resume_path: str) -> Path:
    """``--use_ema``: the EMA export that training with ``--use_ema`` wrote beside ``resume_path``:
    ``transformer_<step>_ema.pt`` beside ``transformer_<step>.pt``, or, for a LoRA student, the folder
    ``lora_<step>_ema/`` (the averaged adapter and heads) beside ``lora_<step>/``."""
    from training.checkpointing import ema_sibling

    path = Path(resume_path)
    lora = re.fullmatch(r"lora_\d+", path.name) is not None
    ema = path.with_name(path.name + "_ema") if lora else ema_sibling(path)
    if ema is None:
        raise ValueError(f"--use_ema needs --resume_path to be a training export ckpts/transformer_<step>.pt or "
                         f"ckpts/lora_<step>/, got {resume_path}; or pass an EMA export itself (transformer_<step>_ema.pt, "
                         "lora_<step>_ema/) as --resume_path without --use_ema")
    if not ema.exists():
        raise FileNotFoundError(f"--use_ema: there is no {ema.name}{'/' if lora else ''} beside {resume_path}; only runs "
                                "trained with --use_ema write one (sample without --use_ema for the raw weights)")
    return ema


def _is_pipeline_folder(path: str | None) -> bool:
    return path is not None and (Path(path) / "model_index.json").is_file()


def _vae_scale_factor(source: str, revision: str | None) -> int:
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the VAE config of {source!r}: is it a FLUX pipeline folder or hub id? ({exc})") from exc
    return 2 ** (len(config["block_out_channels"]) - 1)


def resolve_device(args: argparse.Namespace, local_rank: int):
    import torch

    if args.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, getattr(torch, DTYPES[name])


def build_pipeline(method: str, args: argparse.Namespace, dtype) -> tuple[Any, int | None]:
    """The method's pipeline and the checkpoint step (None for a teacher without weights file)."""
    from model.pipeline import PIPELINES, checkpoint_step, load_teacher_pipeline
    from model.loading import read_checkpoint

    try:
        if method == "teacher":
            pipe = load_teacher_pipeline(args.pretrained_model_name_or_path, args.resume_path,
                                         timestep_scale=args.timestep_scale, dtype=dtype, revision=args.revision)
            step = checkpoint_step(read_checkpoint(args.resume_path)) if args.resume_path else None
            return pipe, step
        cls = PIPELINES[method]
        overrides = {"sigma_data": args.sigma_data} if method == "scm" else {}
        if _is_pipeline_folder(args.resume_path):
            pipe = cls.from_pretrained(args.resume_path, dtype=dtype)
            if overrides:
                pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, **overrides})
            if args.timestep_scale is not None and float(pipe.transformer.config.timestep_scale) != args.timestep_scale:
                raise ValueError(f"{args.resume_path} was exported with timestep_scale="
                                 f"{pipe.transformer.config.timestep_scale:g}, not {args.timestep_scale:g}")
            info = Path(args.resume_path) / "export_info.json"
            step = json.loads(info.read_text()).get("step") if info.is_file() else None
            return pipe, step
        pipe = cls.from_checkpoint(args.pretrained_model_name_or_path, args.resume_path, timestep_scale=args.timestep_scale,
                                   dtype=dtype, revision=args.revision, lora_base=args.lora_base, **overrides)
        return pipe, pipe.checkpoint_step
    except OSError as exc:  # diffusers/transformers report unreadable folders and hub misses as OSError
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"could not load the pipeline: {exc}") from exc


def make_sampler(pipe, method: str, args: argparse.Namespace):
    """``sampler(prompts, generators) -> PIL images``; encodes each distinct prompt of a batch once."""
    import torch

    extra: dict[str, Any] = {}
    if method == "scm":
        from model.pipeline import SCM_INTERMEDIATE_TIMESTEP, SCM_MAX_TIMESTEP

        extra = dict(max_timesteps=args.max_timestep if args.max_timestep is not None else SCM_MAX_TIMESTEP,
                     intermediate_timesteps=(args.intermediate_timestep if args.intermediate_timestep is not None
                                             else SCM_INTERMEDIATE_TIMESTEP))
    elif method == "meanflow":
        extra = dict(time_schedule=args.time_schedule)

    device = pipe._execution_device  # looked up once: diffusers walks every submodule to find it

    @torch.no_grad()
    def sampler(prompts: list[str], generators: list[torch.Generator]):
        unique = list(dict.fromkeys(prompts))
        embeds, pooled, _ = pipe.encode_prompt(prompt=unique, prompt_2=None, device=device,
                                               max_sequence_length=args.max_sequence_length)
        index = torch.tensor([unique.index(p) for p in prompts], device=embeds.device)
        return pipe(prompt_embeds=embeds[index], pooled_prompt_embeds=pooled[index], height=args.resolution,
                    width=args.resolution, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, generator=generators, max_sequence_length=args.max_sequence_length,
                    output_type="pil", **extra).images

    return sampler, extra


def main(method: str, argv: list[str] | None = None):
    """Run one sampling CLI; returns the :class:`~evaluation.generate.GenerationReport`."""
    args = parse_args(method, argv)
    from evaluation.generate import distributed_env, generate_folder

    rank, world, local_rank = distributed_env()
    if rank > 0:  # one set of loading bars is enough
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    if args.ds_file:
        print(f"note: --ds_file {args.ds_file} is ignored (sampling needs no DeepSpeed)", file=sys.stderr)
    rows = load_rows(args)
    if args.resume_path is not None and not Path(args.resume_path).exists():
        raise FileNotFoundError(f"--resume_path not found: {args.resume_path}")
    if getattr(args, "use_ema", False):
        args.resume_path = str(ema_export_of(args.resume_path))
    if rank == 0:
        warn_guidance_range(args)
    from training.launch import check_output_dir_writable

    check_output_dir_writable(args.output_dir)  # a read-only disk fails here, before minutes of loading
    components = args.resume_path if _is_pipeline_folder(args.resume_path) else args.pretrained_model_name_or_path
    from model.flux_io import check_resolution

    check_resolution(args.resolution, _vae_scale_factor(components, args.revision))
    device, dtype = resolve_device(args, local_rank)

    pipe, step = build_pipeline(method, args, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sampler, extra = make_sampler(pipe, method, args)
    run_config = dict(method=method, pretrained_model_name_or_path=components,
                      resume_path=None if args.resume_path is None else os.path.abspath(args.resume_path),
                      checkpoint_step=step, timestep_scale=float(pipe.transformer.config.timestep_scale),
                      resolution=args.resolution, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length, seed=args.seed,
                      dtype=str(dtype).replace("torch.", ""), **extra)
    if method == "scm":
        run_config["sigma_data"] = float(pipe.scheduler.config.sigma_data)
    report = generate_folder(rows, args.output_dir, sampler, n_samples=args.n_samples, batch_size=args.batch_size,
                             seed=args.seed, rank=rank, world_size=world, grid=args.grid, run_config=run_config,
                             nfe=args.num_inference_steps, progress=not args.no_progress)
    print(report.summary(), flush=True)
    return report


def cli(method: str, argv: list[str] | None = None) -> int:
    """Entry point of the root scripts: user errors → one line on stderr and exit status 2."""
    from training.cli import run_cli

    return run_cli(lambda: main(method, argv))
