"""A small FLUX teacher for the shapes world, trained from scratch on CPU and cached on disk.

The teacher is a complete diffusers ``FluxPipeline`` folder built with the same classes as the real
``Freepik/flux.1-lite-8B`` (``FluxTransformer2DModel`` with a guidance embedding, ``AutoencoderKL``,
CLIP + T5 text encoders, ``FlowMatchEulerDiscreteScheduler``), so every trainer and sampling CLI of
the project runs on it unchanged. Components and how they are obtained:

* tokenizers, text encoders and scheduler: :func:`data.tiny_flux.build_tiny_flux_pipeline` with the
  sizes of :func:`default_flux_config`. In recipe v1 the text encoders stay **random and frozen**:
  captions differ by words, so even random CLIP/T5 give distinguishable word embeddings (but not
  binding; see recipe v2 below).
* VAE: an ``AutoencoderKL`` with three blocks (spatial factor 4: 64² pixels → 16×16×8 latents → 8×8 =
  64 packed tokens of 32 channels), **trained** on rendered shapes images with
  ``L = mean|D(z) − x| + β·KL(q(z|x) ‖ N(0, I)) / dim(z)``, ``z ~ q(z|x)``. Afterwards FLUX's latent
  normalisation ``(z − shift)·scale`` is set from the statistics of the posterior means of the training
  images (``shift`` = mean, ``scale`` = 1/std), so the flow model sees latents of unit variance.
* transformer: a stock ``FluxTransformer2DModel`` (time inputs ×1000, as FLUX) trained by flow matching
  on the packed, normalised latents that :class:`model.flux_io.FluxConditioner` produces (the trainers'
  own encoding path)::

      x₀ = pack((VAE(x) − shift)·scale),  ε ~ N(0, I),  z_t = (1 − t)·x₀ + t·ε,  v = ε − x₀
      L = ‖v_θ(z_t, t, g, c) − v‖² / dim(x₀)

  starting from DiT's adaLN-Zero initialisation (every block the identity, output 0), with ``t``
  drawn half from logit-normal(0, 1) (SD3's proposal: mid times, where the content is
  decided) and half from U(0, 1) (so the ends, used by 1-step students and the first sampler step,
  are covered too); caption dropout: with probability ``caption_dropout`` the caption is replaced by
  ``" "`` (the unconditional prompt of the MeanFlow trainer).
  **Guidance**: FLUX.1-lite is guidance-distilled, i.e. it takes the guidance scale ``g`` as an
  embedding input. This teacher keeps that input (``guidance_embeds=True``) and is trained with ``g ~
  U(guidance_min, guidance_max)`` but with the plain conditional target ``v``, so ``g`` is an input the
  model learns to ignore; it is *not* guidance-distilled. Any ``g`` in that range (3.5 for sampling,
  {4, 4.5, 5} in the students' training) therefore gives the conditional model. The exported weights
  are an exponential moving average (``ema_decay``) of the trained ones.

Recipe v2 (``--recipe v2``, :func:`teacher_recipe`; why: docs/toy_benchmark/teacher_diagnosis.md) changes
three things: the CLIP and T5 encoders are **trained jointly** with the transformer during flow matching
(random frozen ones hand the transformer, which sees text tokens without position, the same bag of word
vectors whatever binds to what); flow matching feeds a constant guidance input ``flow_guidance`` = 1 with
caption dropout, so classifier-free guidance works; then **guidance distillation** as FLUX-dev
(:func:`run_guidance_distillation`): the guidance embedding learns the CFG velocity for w ~ U[1, 6].

Recipe v3 first pretrains the text encoders to parse the captions (:func:`run_text_pretraining`): the
joint training of v2 alone separated words but not binding after hundreds of steps. Recipe v4 then
keeps them frozen during flow matching (as FLUX's): joint training undid the pretrained binding. Recipe v5
widens the RoPE axes (measured worse); recipe v6 is v4 with the training flow times shifted towards high noise
(``flow_time_shift`` 3), where the layout, and so the relation word, is decided; recipe v7, the committed
teacher's, is v6 drawing position rows 4 times and counting rows twice as often in flow matching.

Long builds run in resumable stages: with ``state_dir`` every stage keeps its state there and a
``Budget`` (``--max_minutes``) stops a call early; the same call again continues bit-identically.

The transformer weights are stored in float16 to keep the folder small (diffusers loads them as float32
unless asked otherwise); the scores in ``teacher_build_info.json`` are measured on the stored weights.

Builds are seeded: the same seed and thread count give bitwise-identical folders. The folder is written
under a temporary name and renamed into place, so an interrupted build never looks complete.

The code lives in :mod:`evaluation.shapes.teacher_build` (one module per responsibility); this module is
the command line and re-exports the public API (and the helpers that tests and diagnostics use).

Command line::

    python -m evaluation.shapes.teacher --output_dir assets/shapes_teacher [--seed 0] [--threads 2]
    python -m evaluation.shapes.teacher --recipe v7 --output_dir OUT --state_dir STATE --max_minutes 80 \
        --reuse_vae_from assets/shapes_teacher      # repeat until it prints "built teacher"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

from evaluation.shapes.teacher_build.build import build_teacher, ensure_teacher
from evaluation.shapes.teacher_build.common import (BUILD_INFO_NAME, UNCONDITIONAL_PROMPT, PathLike,
                                                    warmup_cosine_lr)
from evaluation.shapes.teacher_build.flow import (adaln_zero_init, draw_flow_batch, run_flow_matching,
                                                  sample_flow_times, train_transformer)
from evaluation.shapes.teacher_build.guidance import cfg_velocity, run_guidance_distillation
from evaluation.shapes.teacher_build.optim import Budget, StageResult, optimise
from evaluation.shapes.teacher_build.recipes import (COMMITTED_RECIPE, RECIPES, TeacherConfig, default_flux_config,
                                                     teacher_recipe)
from evaluation.shapes.teacher_build.scoring import sample_to_folder, score_pipeline
from evaluation.shapes.teacher_build.state import STATE_CONFIG_NAME, read_build_info, snapshot_pipeline
from evaluation.shapes.teacher_build.text import (CAPTION_HEADS, FrozenText, TrainableText, caption_probe_loss,
                                                  caption_targets, run_text_pretraining)
from evaluation.shapes.teacher_build.vae import train_vae, vae_reconstruction_report, vae_statistics

# The private names this module had before the split (tests, diagnose.py and older scripts use them).
from evaluation.shapes.teacher_build.build import _index_of  # noqa: F401
from evaluation.shapes.teacher_build.common import images_from_rows as _images_from_rows  # noqa: F401
from evaluation.shapes.teacher_build.common import progress_bar as _progress  # noqa: F401
from evaluation.shapes.teacher_build.common import to_pixels as _to_pixels  # noqa: F401
from evaluation.shapes.teacher_build.flow import encode_latents as _encode_latents  # noqa: F401
from evaluation.shapes.teacher_build.optim import atomic_save as _atomic_save  # noqa: F401
from evaluation.shapes.teacher_build.optim import ema_state_dicts as _ema_state_dicts  # noqa: F401
from evaluation.shapes.teacher_build.optim import load_ema as _load_ema  # noqa: F401
from evaluation.shapes.teacher_build.recipes import VAE_FIELDS as _VAE_FIELDS  # noqa: F401
from evaluation.shapes.teacher_build.recipes import VAE_FLUX_FIELDS as _VAE_FLUX_FIELDS  # noqa: F401
from evaluation.shapes.teacher_build.recipes import config_key as _config_key  # noqa: F401
from evaluation.shapes.teacher_build.recipes import vae_key as _vae_key  # noqa: F401
from evaluation.shapes.teacher_build.state import full_log as _full_log  # noqa: F401
from evaluation.shapes.teacher_build.state import open_state_dir as _open_state_dir  # noqa: F401
from evaluation.shapes.teacher_build.state import paused_report as _paused  # noqa: F401
from evaluation.shapes.teacher_build.state import publish as _publish  # noqa: F401
from evaluation.shapes.teacher_build.state import tmp_sibling as _tmp_sibling  # noqa: F401
from evaluation.shapes.teacher_build.text import caption_probe_class as _caption_probe_class  # noqa: F401
from evaluation.shapes.teacher_build.text import encode_captions as _encode_captions  # noqa: F401
from evaluation.shapes.teacher_build.text import frozen_text as _frozen_text  # noqa: F401
from evaluation.shapes.teacher_build.vae import vae_stage as _vae_stage  # noqa: F401

__all__ = [
    "TeacherConfig",
    "teacher_recipe",
    "RECIPES",
    "COMMITTED_RECIPE",
    "Budget",
    "optimise",
    "run_flow_matching",
    "run_guidance_distillation",
    "cfg_velocity",
    "default_flux_config",
    "build_teacher",
    "ensure_teacher",
    "read_build_info",
    "sample_to_folder",
    "BUILD_INFO_NAME",
    "UNCONDITIONAL_PROMPT",
    "StageResult",
    "snapshot_pipeline",
    "score_pipeline",
    "train_vae",
    "vae_statistics",
    "vae_reconstruction_report",
    "adaln_zero_init",
    "sample_flow_times",
    "draw_flow_batch",
    "train_transformer",
    "FrozenText",
    "TrainableText",
    "CAPTION_HEADS",
    "caption_targets",
    "caption_probe_loss",
    "run_text_pretraining",
    "warmup_cosine_lr",
    "config_from_args",
    "PathLike",
    "STATE_CONFIG_NAME",
    "main",
]


# --------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.shapes.teacher",
        description="Build (train) the shapes-world FLUX teacher pipeline: a VAE trained on rendered shapes, CLIP/T5 "
                    "text encoders (random and frozen in recipe v1; trained with the transformer in v2; in v3 first "
                    "pretrained to parse the captions; from v4 on pretrained, then frozen), a FluxTransformer2DModel "
                    "trained by flow matching (from v2 on: with caption dropout, then guidance-distilled as FLUX-dev; "
                    "v6: flow times shifted towards high noise; v7: position and counting rows drawn more often). Writes a FluxPipeline folder with "
                    f"{BUILD_INFO_NAME} (timings, VAE reconstruction check, held-out score). Long builds run in "
                    "stages: give --state_dir and --max_minutes, and run the same command again to continue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", required=True, help="pipeline folder to write (replaced atomically when done)")
    p.add_argument("--recipe", choices=RECIPES, default=COMMITTED_RECIPE,
                   help="build recipe (see teacher_recipe); the default is the committed teacher's")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice of the build (default: 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, i.e. OMP_NUM_THREADS); the same seed and thread "
                        "count give identical weights. On a busy machine use 1: two threads that wait for each "
                        "other can run many times slower than one")
    for name, kind, text in (("num_images", int, "rendered training images"),
                             ("vae_steps", int, "VAE optimizer steps"),
                             ("steps", int, "flow-matching optimizer steps of the transformer"),
                             ("batch_size", int, "flow-matching batch size"),
                             ("learning_rate", float, "flow-matching peak LR"),
                             ("distill_steps", int, "guidance-distillation steps (0: none)"),
                             ("text_pretrain_steps", int, "caption-parsing pretraining steps of the text encoders "
                                                         "(0: none)"),
                             ("eval_prompts_per_tag", int, "held-out prompts per GenEval tag scored after the build "
                                                          "(0: skip scoring)"),
                             ("eval_samples", int, "samples per held-out prompt")):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: the recipe's)")
    p.add_argument("--state_dir", default=None,
                   help="folder for the resumable state of every stage (VAE, flow.pt, distill.pt); the same command "
                        "with the same folder continues an interrupted or --max_minutes-stopped build exactly")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="stop after this many minutes of training in this call, saving the state (needs --state_dir)")
    p.add_argument("--max_steps_per_call", type=int, default=None,
                   help="stop after this many optimizer steps in this call, saving the state (needs --state_dir)")
    p.add_argument("--reuse_vae_from", default=None,
                   help="teacher folder whose VAE was built with the same VAE settings: use it instead of training "
                        "the VAE again (recorded in the build info)")
    p.add_argument("--snapshot_from", default=None,
                   help="instead of training, write OUTPUT_DIR from the EMA weights in this --state_dir folder (to "
                        "score an unfinished staged build, e.g. with python -m evaluation.shapes.diagnose)")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUTPUT_DIR when it already holds a teacher built with the same settings")
    p.add_argument("--no_progress", action="store_true", help="disable progress bars")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TeacherConfig:
    """The recipe's config with the command-line overrides."""
    config = teacher_recipe(args.recipe)
    overrides = {k: getattr(args, k) for k in ("seed", "num_images", "vae_steps", "steps", "batch_size",
                                                "learning_rate", "distill_steps", "text_pretrain_steps",
                                                "eval_prompts_per_tag",
                                                "eval_samples") if getattr(args, k) is not None}
    return replace(config, **overrides)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    config = config_from_args(args)
    if (args.max_minutes is not None or args.max_steps_per_call is not None) and args.state_dir is None:
        print("error: --max_minutes/--max_steps_per_call need --state_dir (where the build resumes from)",
              file=sys.stderr)
        return 2
    try:
        config.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        print(f"error: --output_dir {out} exists and is not a folder; choose another path", file=sys.stderr)
        return 2
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.snapshot_from is not None:
        return _snapshot(args.snapshot_from, out)
    return _build(args, config, out)


def _snapshot(state_dir: str, out: Path) -> int:
    """``--snapshot_from``: write ``out`` from the EMA weights of a staged build."""
    try:
        where = snapshot_pipeline(state_dir, out)
    except (ValueError, OSError) as exc:
        print(f"error: --snapshot_from: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} from {state_dir}: {where['stage']} step {where['step']}/{where['total']}")
    return 0


def _build(args: argparse.Namespace, config: TeacherConfig, out: Path) -> int:
    """Build (or resume, or reuse) the teacher and print what happened."""
    budget = None
    if args.max_minutes is not None or args.max_steps_per_call is not None:
        budget = Budget(args.max_minutes, args.max_steps_per_call)
    try:
        folder, info, rebuilt = ensure_teacher(out, config, force=not args.reuse, progress=not args.no_progress,
                                               state_dir=args.state_dir, budget=budget,
                                               reuse_vae_from=args.reuse_vae_from)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if info.get("status") == "paused":
        print(f"paused in {info['stage']} at step {info['step']}/{info['total']}; state in {info['state_dir']} "
              "(run the same command again to continue)")
        return 0
    print(f"{'built' if rebuilt else 'reused'} teacher at {folder}")
    if rebuilt:
        print(f"build time {info['timings']['total_s']:.0f} s ({json.dumps(info['timings'])})")
    vae = info["vae"]
    print(f"VAE: mean |error| {vae['mean_abs_error_8bit']:.2f}/255, scorer on reconstructions "
          f"{100 * vae['scorer_accuracy_reconstructed']:.1f}% (originals {100 * vae['scorer_accuracy_original']:.1f}%)")
    if info.get("evaluation"):
        ev = info["evaluation"]
        tasks = ", ".join(f"{k} {100 * v['accuracy']:.0f}" for k, v in ev["tasks"].items())
        print(f"{ev['steps']}-step held-out score: overall {100 * ev['overall']:.1f}% ({tasks})")
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
