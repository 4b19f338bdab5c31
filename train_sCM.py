"""sCM distillation of a FLUX teacher into a 1–4 step consistency student.

Single process:      python train_sCM.py --pretrained_model_name_or_path PIPE --output_dir OUT ...
Multi-GPU/DeepSpeed: bash script/train_sCM.sh LR RESOLUTION BATCH OUT RESCALED.pt
See ``training/scm.py`` for the loss and ``training/core.py`` for the shared loop.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.trigflow import LOGVAR_INPUTS
from training.args import build_parser, float_list, validate_common_args
from training.scm import SCMMethod


def parse_args(argv: list[str] | None = None):
    p = build_parser(__doc__.splitlines()[0])
    g = p.add_argument_group("sCM")
    g.add_argument("--sigma_data", type=float, default=0.5, help="TrigFlow data standard deviation σ_d.")
    g.add_argument("--logit_mean", type=float, default=0.2, help="Mean of log(σ_d·tan t) (time proposal).")
    g.add_argument("--logit_std", type=float, default=1.6, help="Std of log(σ_d·tan t) (time proposal).")
    g.add_argument("--scm_cfg_scale", type=float_list, default=(4.0, 4.5, 5.0),
                   help="Guidance-embedding scales sampled per sample, e.g. '4,4.5,5'.")
    g.add_argument("--tangent_warmup_steps", type=int, default=4000, help="Steps over which r ramps 0 → 1.")
    g.add_argument("--tangent_norm_eps", type=float, default=0.1, help="c in g/(‖g‖ + c).")
    g.add_argument("--scm_lambda", type=float, default=1.0, help="Loss multiplier λ.")
    g.add_argument("--logvar_input", choices=LOGVAR_INPUTS, default="trig_time",
                   help="Input of the adaptive-weight head logvar = Linear(c). 'trig_time' (the original release): "
                        "c = time_text_embed(t, guidance, pooled) recomputed at the TrigFlow angle t with the x1 "
                        "sinusoid; its gradient also trains the time/guidance/text embedders. 'flow_time': c = the "
                        "conditioning FLUX computes for its own forward at the flow time s = sin t/(cos t + sin t) "
                        "(the vector that modulates the blocks, within the [0, 1] time range the rescaled embedder "
                        "was trained on, while t reaches pi/2; no extra embedding pass). Changes the loss weights, "
                        "so it is a different method from the release's.")
    g.add_argument("--merged_jvp", action="store_true",
                   help="Compute the student's output F (with gradients) and its JVP tangent dF/dt in ONE forward-mode "
                        "pass instead of a no-grad JVP plus a separate gradient forward: one student forward less per "
                        "step (medium model, 1024 tokens, CPU: 0.87x the step time, 1.65x its peak memory, "
                        "benchmarks/train_step.py --merged_jvp). F, logvar and their backward are unchanged, but the "
                        "tangents stay in memory until the forward ends, and the tangent differs from the release's by "
                        "float rounding (~1e-7), hence off by default. Works with DDP, DeepSpeed ZeRO-2 and LoRA "
                        "students; refused with --gradient_checkpointing and DeepSpeed ZeRO-3.")
    args = p.parse_args(argv)
    validate_common_args(args)
    if args.merged_jvp:
        check_merged_jvp(args)
    if args.sigma_data <= 0 or args.logit_std <= 0:
        p.error("--sigma_data and --logit_std must be > 0")
    if args.tangent_warmup_steps < 0:
        p.error("--tangent_warmup_steps must be >= 0")
    return args


def check_merged_jvp(args: argparse.Namespace) -> None:
    """Refuse --merged_jvp where the run could not do it (training/scm.py merged_pass_blocker), before loading."""
    if args.gradient_checkpointing:
        raise ValueError("--merged_jvp cannot be combined with --gradient_checkpointing: the checkpointed blocks are "
                         "recomputed in backward without their tangents; drop one of the two")
    if args.ds_file is not None:
        stage = json.loads(Path(args.ds_file).read_text()).get("zero_optimization", {}).get("stage", 0)
        if stage >= 3:
            raise ValueError(f"--merged_jvp cannot be used with DeepSpeed ZeRO-{stage} ({args.ds_file}): its parameter "
                             "hooks have no forward-mode derivative; use a ZeRO-2 config or drop --merged_jvp")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from training.core import train  # heavy imports only after the flags are valid

    train(args, SCMMethod.from_args(args))


if __name__ == "__main__":
    from training.cli import exit_process, run_cli

    exit_process(run_cli(main))
