r"""Turn a training checkpoint into a diffusers pipeline folder that loads with or without this repository.

    python export_diffusers.py --method scm --checkpoint OUT/ckpts/transformer_10000.pt \
        --pretrained_model_name_or_path Freepik/flux.1-lite-8B --output_dir exports/scm-10000

``--method scm`` / ``meanflow`` export a student (SCMFluxPipeline / MeanFlowFluxPipeline);
``--method teacher`` exports a rescaled teacher (``train_rescale.py``'s checkpoint) as a stock
``FluxPipeline`` around our transformer.  The folder holds the ``transformer/`` (our config incl.
``timestep_scale`` and ``interval_embedding``, safetensors weights), the method's ``scheduler/``
(SCMScheduler for sCM, the teacher's FlowMatchEulerDiscreteScheduler otherwise), the teacher's VAE,
text encoders and tokenizers (copied, or symlinked with ``--link symlink``), ``export_info.json``
(source checkpoint, step, method), and our code for diffusers' remote-code loading: the pipeline
modules at the root (``pipeline.py`` and the modules it imports) and ``transformer/transformer.py``.

In plain diffusers (this repository not installed)::

    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("exports/scm-10000", trust_remote_code=True, dtype=torch.bfloat16)

In this repository our classes read the folder with the repository's code (no remote code runs)::

    from model.pipeline import SCMFluxPipeline
    pipe = SCMFluxPipeline.from_pretrained("exports/scm-10000", dtype=torch.bfloat16)

or sample it directly: ``python test_sCM.py --resume_path exports/scm-10000 ...``.
The folder is assembled under a temporary name next to ``--output_dir`` and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

COMPONENTS_TO_COPY = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "image_encoder",
                      "feature_extractor")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=["scm", "meanflow", "teacher"], required=True,
                   help="What the checkpoint holds: an sCM or MeanFlow student, or a rescaled teacher (FluxPipeline).")
    p.add_argument("--checkpoint", required=True,
                   help="Training export ckpts/transformer_<step>.pt ({'module', 'config', 'step'} or the original "
                        "{'module'}), a .safetensors file, a transformer folder, or a LoRA export ckpts/lora_<step>/.")
    p.add_argument("--pretrained_model_name_or_path", default="Freepik/flux.1-lite-8B",
                   help="FLUX pipeline the student was distilled from (VAE, encoders, tokenizers, scheduler; and the "
                        "transformer config for checkpoints without one).")
    p.add_argument("--revision", default=None, help="Hub revision of --pretrained_model_name_or_path.")
    p.add_argument("--output_dir", required=True, help="Pipeline folder to create (must not exist unless --overwrite).")
    p.add_argument("--timestep_scale", type=float, default=None,
                   help="Only for checkpoints without a config: the student's time-input scale (default 1, the original's).")
    p.add_argument("--sigma_data", type=float, default=0.5, help="sCM only: TrigFlow sigma_d stored in the scheduler.")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="dtype of the saved transformer weights; auto = the checkpoint's own.")
    p.add_argument("--link", choices=["copy", "symlink"], default="copy",
                   help="copy the teacher's other components (self-contained folder) or symlink them (no extra disk; "
                        "the folder then depends on the source staying in place).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --output_dir.")
    p.add_argument("--fuse_lora", action="store_true",
                   help="LoRA checkpoints: write W + (alpha/r)*B*A into transformer/ (a plain student). Without it the "
                        "folder holds the base transformer (+ trained heads) and the adapter as "
                        "pytorch_lora_weights.safetensors, which our pipelines' from_pretrained applies.")
    p.add_argument("--lora_base", default=None,
                   help="LoRA checkpoints: the weights the adapter was trained on (default: the run's "
                        "--rescaled_checkpoint_path recorded in lora_info.json).")
    args = p.parse_args(argv)
    if args.sigma_data <= 0:
        p.error("--sigma_data must be > 0")
    return args


def _source_folder(pretrained: str, revision: str | None) -> Path:
    """Local folder of the teacher pipeline (hub ids resolve to the local HF cache snapshot)."""
    if Path(pretrained).is_dir():
        return Path(pretrained)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(pretrained, revision=revision,
                                      allow_patterns=["model_index.json", *(f"{c}/*" for c in COMPONENTS_TO_COPY),
                                                      "scheduler/*"]))
    except Exception as exc:  # noqa: BLE001 - hub errors have many types; all mean "cannot get the source"
        raise ValueError(f"cannot get the pipeline {pretrained!r} ({exc})") from exc


def _checkpoint_dtype(state_dict: dict):
    for value in state_dict.values():
        if value.is_floating_point():
            return value.dtype
    import torch

    return torch.float32


def _ship_code(folder: Path, pipeline: bool) -> None:
    """Copy our modules for diffusers' remote-code loading (model.pipeline.REMOTE_CODE_MODULES).

    ``transformer/transformer.py`` defines the transformer class model_index.json names; the pipeline
    modules go to the root, where diffusers looks for ``<_class_name[0]>.py`` and its relative imports.
    """
    from model.pipeline import REMOTE_CODE_MODULES

    package = Path(__file__).resolve().parent / "model"
    shutil.copyfile(package / "transformer.py", folder / "transformer" / "transformer.py")
    if pipeline:
        for name in REMOTE_CODE_MODULES:
            shutil.copyfile(package / f"{name}.py", folder / f"{name}.py")


def export(args: argparse.Namespace) -> Path:
    import torch
    from diffusers import __version__ as diffusers_version

    from model.loading import read_checkpoint
    from model.lora import LORA_WEIGHTS, is_lora_folder
    from diffusers import FlowMatchEulerDiscreteScheduler

    from model.pipeline import PIPELINES, REMOTE_TRANSFORMER_ENTRY, checkpoint_step, load_student_transformer

    out = Path(args.output_dir)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--output_dir {out} exists; pass --overwrite to replace it")
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint not found: {args.checkpoint}")
    source = _source_folder(args.pretrained_model_name_or_path, args.revision)
    index_file = source / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
    model_index = json.loads(index_file.read_text())

    lora = is_lora_folder(args.checkpoint)
    if args.fuse_lora and not lora:
        raise ValueError(f"--fuse_lora needs a LoRA export folder (OUT/ckpts/lora_<step>/), not {args.checkpoint}")
    dtype = (getattr(torch, DTYPES[args.dtype]) if args.dtype != "auto"
             else torch.float32 if lora else _checkpoint_dtype(read_checkpoint(args.checkpoint).state_dict))
    transformer, ckpt = load_student_transformer(args.checkpoint, args.pretrained_model_name_or_path, method=args.method,
                                                 timestep_scale=args.timestep_scale, dtype=dtype, revision=args.revision,
                                                 lora_base=args.lora_base, fuse_lora=args.fuse_lora)
    adapter = lora and not args.fuse_lora
    if adapter:
        transformer.unload_lora()  # transformer/ holds the base (+ heads); the adapter goes beside it, unfused
    base_scheduler = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    if args.method == "teacher":
        pipeline_name, scheduler = "FluxPipeline", FlowMatchEulerDiscreteScheduler.from_config(base_scheduler)
    else:
        pipeline_name = PIPELINES[args.method].__name__
        scheduler = PIPELINES[args.method].default_scheduler(base_scheduler)
    if args.method == "scm":
        scheduler = type(scheduler).from_config({**scheduler.config, "sigma_data": args.sigma_data})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        if adapter:  # diffusers' LoRA file at the pipeline root: pipe.load_lora_weights(folder) reads it
            shutil.copyfile(Path(args.checkpoint) / LORA_WEIGHTS, tmp / LORA_WEIGHTS)
        scheduler.save_pretrained(tmp / "scheduler")
        for name in COMPONENTS_TO_COPY:
            entry = model_index.get(name)
            if not entry or entry[0] is None or not (source / name).is_dir():
                continue
            if args.link == "symlink":
                os.symlink((source / name).resolve(), tmp / name, target_is_directory=True)
            else:
                shutil.copytree(source / name, tmp / name)
        model_index.update({
            "_class_name": pipeline_name if args.method == "teacher" else ["pipeline", pipeline_name],
            "_diffusers_version": diffusers_version,
            "transformer": list(REMOTE_TRANSFORMER_ENTRY),
            "scheduler": ["diffusers", type(scheduler).__name__],
        })
        _ship_code(tmp, pipeline=args.method != "teacher")
        (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
        info = dict(method=args.method, pipeline_class=pipeline_name, source_checkpoint=os.path.abspath(ckpt.path),
                    step=checkpoint_step(ckpt), pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                    timestep_scale=float(transformer.config.timestep_scale), dtype=str(dtype).replace("torch.", ""),
                    components=args.link, lora="adapter" if adapter else "fused" if lora else None)
        (tmp / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {args.method} (step {info['step']}) to {out}; load it with DiffusionPipeline.from_pretrained("
          f"{str(out)!r}, trust_remote_code=True), or in this repository with "
          f"{'model.pipeline.load_teacher_pipeline' if args.method == 'teacher' else pipeline_name + '.from_pretrained'}"
          f"({str(out)!r})")
    return out


def main(argv: list[str] | None = None) -> Path:
    return export(parse_args(argv))


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))
