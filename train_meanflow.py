"""MeanFlow distillation of a FLUX teacher into a few-step dual-time (r, t) student, with CFG MeanFlow.

Single process:      python train_meanflow.py --pretrained_model_name_or_path PIPE --output_dir OUT ...
Multi-GPU/DeepSpeed: bash script/train_meanflow.sh LR RESOLUTION BATCH CFG_MEANFLOW OMEGA KAPPA MIN_T MAX_T OUT RESCALED.pt
See ``training/meanflow.py`` for the loss (every equation) and ``training/core.py`` for the shared loop.
"""
from __future__ import annotations

import os
import sys

from training.args import build_parser, float_list, str2bool, validate_common_args
from training.meanflow import (CFG_VELOCITY_INTERVALS, DUAL_TIME_INITS, JVP_VELOCITIES, PATH_TYPES, TIME_SAMPLERS,
                               WEIGHTINGS, MeanFlowLossConfig)


def parse_args(argv: list[str] | None = None):
    p = build_parser(__doc__.splitlines()[0])
    g = p.add_argument_group("MeanFlow")
    g.add_argument("--dual_time_init", choices=DUAL_TIME_INITS, default="copy",
                   help="Initialisation of the student's second timestep embedder (for the interval t - r): 'copy' "
                        "the teacher's timestep embedder (the original), or 'zero' (its last layer zeroed, so the "
                        "student starts exactly equal to the teacher).")
    g.add_argument("--time_sampler", choices=TIME_SAMPLERS, default="logit_normal",
                   help="Distribution of the two time draws sorted into r <= t: 'logit_normal' = sigmoid(N(mu, "
                        "sigma^2)) or 'uniform' on [0, 1].")
    g.add_argument("--time_mu", type=float, default=-0.4, help="Mean mu of the logit-normal time sampler.")
    g.add_argument("--time_sigma", type=float, default=1.0, help="Std sigma of the logit-normal time sampler (> 0).")
    g.add_argument("--ratio_r_not_equal_t", type=float, default=0.75,
                   help="Fraction of rows with r < t; the other rows get r = t (plain flow matching onto the "
                        "teacher). 0.75 → 25%% of rows have r = t.")
    g.add_argument("--path_type", choices=PATH_TYPES, default="linear",
                   help="Noising path: 'linear' z = (1-t)x + t*eps (FLUX's) or 'cosine' z = cos(pi t/2)x + "
                        "sin(pi t/2)eps (the linear teacher's velocity is converted to it).")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="adaptive",
                   help="'adaptive': per-sample loss L/(L + 1e-3)^p; 'uniform': plain mean of L = sum of squared "
                        "errors per sample.")
    g.add_argument("--adaptive_p", type=float, default=1.0,
                   help="Power p of the adaptive weighting (MeanFlow's gamma-loss: p = 1 - gamma; 1 as the original).")
    g.add_argument("--cfg_scale", type=float_list, nargs="+", default=None,
                   help="Guidance-embedding scales sampled per sample and fed to teacher and student, as "
                        "'4,4.5,5' or '4 4.5 5' (the original's form). Default: 4,4.5,5.")
    g.add_argument("--cfg_prob", type=float, default=0.1,
                   help="Label dropout: probability of replacing a prompt by \" \" (applies with or without CFG "
                        "MeanFlow, as the original).")
    g.add_argument("--use_cfg_meanflow", type=str2bool, nargs="?", const=True, default=False,
                   help="CFG MeanFlow: inside [cfg_min_t, cfg_max_t] and for kept prompts the target velocity is "
                        "omega*v_teacher + kappa*u_cond + (1-omega-kappa)*u_uncond. Accepts '=True/False'.")
    g.add_argument("--cfg_omega", type=float, default=1.0,
                   help="omega: the teacher velocity's weight in the guided target (> 0).")
    g.add_argument("--cfg_kappa", type=float, default=0.0,
                   help="kappa in [0, 1): the student's conditional velocity's weight; effective guidance scale is "
                        "omega/(1-kappa). omega + kappa > 1 is allowed (CFG extrapolation) and reported.")
    g.add_argument("--cfg_min_t", type=float, default=0.0, help="Lower end of the CFG time window (t in [0, 1]).")
    g.add_argument("--cfg_max_t", type=float, default=1.0, help="Upper end of the CFG time window (t in [0, 1]).")
    g.add_argument("--jvp_velocity", choices=JVP_VELOCITIES, default="data",
                   help="JVP tangent on rows outside the CFG window: 'data' = eps - x (the original; its target "
                        "still uses the teacher velocity) or 'teacher' = the teacher velocity (consistent).")
    g.add_argument("--cfg_velocity_interval", choices=CFG_VELOCITY_INTERVALS, default="interval",
                   help="Interval h at which CFG MeanFlow evaluates the student's u_cond/u_uncond in the guided "
                        "target: 'interval' (h = t - r, the row's own interval, as the original release) or 'zero' "
                        "(h = 0: the instantaneous velocity, as the MeanFlow paper and its code; the guided target "
                        "is then an instantaneous velocity like the teacher's, and its fixed point is CFG with "
                        "effective scale omega/(1-kappa)). 'zero' is a different method from the release's.")
    args = p.parse_args(argv)
    args.cfg_scale = (4.0, 4.5, 5.0) if args.cfg_scale is None else tuple(v for group in args.cfg_scale for v in group)
    validate_common_args(args)
    warnings = MeanFlowLossConfig.from_args(args).validate()
    if int(os.environ.get("RANK", "0")) == 0:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from training.core import train  # heavy imports only after the flags are valid
    from training.meanflow import MeanFlowMethod

    train(args, MeanFlowMethod.from_args(args))


if __name__ == "__main__":
    from training.cli import exit_process, run_cli

    exit_process(run_cli(main))
