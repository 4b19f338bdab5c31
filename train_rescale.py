"""Rescale a stock FLUX teacher so its timestep and guidance inputs live in [0, 1] (the recipe's first step).

Single process:      python train_rescale.py --pretrained_model_name_or_path PIPE --output_dir OUT ...
Multi-GPU/DeepSpeed: bash script/rescale_teacher.sh LR RESOLUTION BATCH OUT
Writes, besides the usual ckpts/ and checkpoints/ of the shared core, OUT/rescaled.pt and the diffusers folder
OUT/rescaled_transformer/ (both with timestep_scale 1); pass either to train_sCM.py/train_meanflow.py as
--rescaled_checkpoint_path.  Measure the result with check_rescale.py.  Loss and defaults: training/rescale.py.
"""
from __future__ import annotations

import os
import sys

from training.args import build_parser, validate_common_args
from training.rescale import LOSSES, OBJECTIVES, TIME_SAMPLINGS

# Flags of the common parser that the rescale trainer sets itself (it always starts from stock weights).
FIXED_FLAGS = {
    "timestep_scale": "Not accepted: the teacher and the student start from the stock (x1000) weights and the "
                      "student is switched to x1 inputs.",
    "rescaled_checkpoint_path": "Not accepted: rescaling starts from the stock weights of "
                                "--pretrained_model_name_or_path; to continue a run use --resume_from_checkpoint.",
}


def parse_args(argv: list[str] | None = None):
    p = build_parser(__doc__.splitlines()[0])
    for action in p._actions:  # argparse has no public API to re-document an inherited flag
        if action.dest in FIXED_FLAGS:
            action.help, action.default = FIXED_FLAGS[action.dest], None
        elif action.dest == "jvp_attention":
            action.help = "Unused by the rescale trainer (its loss has no JVP)."
    g = p.add_argument_group("rescale")
    g.add_argument("--objective", choices=OBJECTIVES, default="self_distill",
                   help="self_distill: match the frozen original (x1000) model's velocity at the same (x_t, t, "
                        "guidance) — the paper's method; flow_matching: the teacher's own loss on data (target "
                        "noise - x0; loses guidance distillation on guidance-distilled teachers).")
    g.add_argument("--loss", choices=LOSSES, default="smooth_l1",
                   help="Distance between the student velocity and the target: smooth_l1 (the paper) or mse.")
    g.add_argument("--smooth_l1_beta", type=float, default=1.0,
                   help="Threshold beta of smooth L1 (quadratic below, linear above); the paper gives none.")
    g.add_argument("--time_sampling", choices=TIME_SAMPLINGS, default="flux_shift",
                   help="Flow time t: flux_shift = sigmoid(logit_mean + mu(resolution) + logit_std*n) (FLUX's "
                        "resolution-dependent shift from the pipeline's scheduler config), logit_normal = "
                        "sigmoid(logit_mean + logit_std*n), uniform = U(0, 1).")
    g.add_argument("--logit_mean", type=float, default=0.0, help="Mean m of the logit-normal time proposal.")
    g.add_argument("--logit_std", type=float, default=1.0, help="Std s of the logit-normal time proposal.")
    g.add_argument("--guidance_min", type=float, default=1.0,
                   help="Guidance-embedding scale g ~ U(guidance_min, guidance_max) per sample (same g for both "
                        "models; the original embeds 1000*g, the rescaled one g).")
    g.add_argument("--guidance_max", type=float, default=6.0, help="Upper end of the guidance range.")
    args = p.parse_args(argv)
    for dest in FIXED_FLAGS:
        if getattr(args, dest) is not None:
            p.error(f"--{dest} is not accepted by train_rescale.py. {FIXED_FLAGS[dest]}")
    args.timestep_scale = 1000.0  # both transformers load as stock; the method switches the student to x1
    validate_common_args(args)
    if args.smooth_l1_beta <= 0 or args.logit_std <= 0:
        p.error("--smooth_l1_beta and --logit_std must be > 0")
    if not 0 <= args.guidance_min <= args.guidance_max:
        p.error(f"need 0 <= --guidance_min <= --guidance_max, got {args.guidance_min} and {args.guidance_max}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from diffusers import FlowMatchEulerDiscreteScheduler  # heavy imports only after the flags are valid

    from training.core import train
    from training.rescale import RescaleLoss, RescaleLossConfig, RescaleMethod, ShiftSchedule, write_final_outputs

    try:
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision)
    except OSError as exc:
        raise ValueError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: no FLUX pipeline "
                         f"scheduler config there ({str(exc).splitlines()[0]}). Pass a FLUX pipeline folder or hub id.") from exc
    config = RescaleLossConfig(objective=args.objective, loss=args.loss, smooth_l1_beta=args.smooth_l1_beta,
                               time_sampling=args.time_sampling, logit_mean=args.logit_mean, logit_std=args.logit_std,
                               guidance_min=args.guidance_min, guidance_max=args.guidance_max,
                               shift=ShiftSchedule.from_scheduler_config(scheduler_config))
    state = train(args, RescaleMethod(RescaleLoss(config)))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if state.step < args.max_train_steps:
        print(f"Stopped at step {state.step} of {args.max_train_steps}: {args.output_dir}/rescaled.pt is written when "
              "the run completes (resume with --resume_from_checkpoint latest).", file=sys.stderr)
        return
    pt, folder = write_final_outputs(args.output_dir, state.step)
    print(f"rescaled teacher (step {state.step}): {pt} and {folder}/ — pass either as --rescaled_checkpoint_path; "
          f"measure it with check_rescale.py")


if __name__ == "__main__":
    from training.cli import exit_process, run_cli

    exit_process(run_cli(main))
