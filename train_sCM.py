"""sCM distillation of a FLUX teacher into a 1–4 step consistency student.

Single process:      python train_sCM.py --pretrained_model_name_or_path PIPE --output_dir OUT ...
Multi-GPU/DeepSpeed: bash script/train_sCM.sh LR RESOLUTION BATCH OUT RESCALED.pt
See ``training/scm.py`` for the loss and ``training/core.py`` for the shared loop.
"""
from __future__ import annotations

import sys

from training.args import build_parser, float_list, validate_common_args
from training.scm import SCMLoss, SCMLossConfig, SCMMethod


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
    args = p.parse_args(argv)
    validate_common_args(args)
    if args.sigma_data <= 0 or args.logit_std <= 0:
        p.error("--sigma_data and --logit_std must be > 0")
    if args.tangent_warmup_steps < 0:
        p.error("--tangent_warmup_steps must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from training.core import train  # heavy imports only after the flags are valid

    loss = SCMLoss(SCMLossConfig(sigma_data=args.sigma_data, logit_mean=args.logit_mean, logit_std=args.logit_std,
                                 tangent_warmup_steps=args.tangent_warmup_steps, tangent_norm_eps=args.tangent_norm_eps,
                                 scm_lambda=args.scm_lambda, cfg_scales=args.scm_cfg_scale))
    train(args, SCMMethod(loss, args.jvp_attention))


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))
