"""How long a full checkpoint save takes: the figure that sizes a preemption signal's lead time.

    python benchmarks/checkpoint_save.py                         # medium model (4 heads × 64, 2 double + 4 single)
    python benchmarks/checkpoint_save.py --saves 5 --json out.json

Runs the real sCM training (``train_sCM.py``'s parser and method, in process, 1 rank) on a random FLUX
pipeline whose transformer has the medium shape, checkpointing after every step, and times each
``save_checkpoint`` call (accelerate ``save_state`` of model + AdamW + RNG + train state, the
``{'module': ...}`` export, the atomic rename).  Prints the bytes written, seconds per save and the disk
throughput that implies, and what that throughput means for FLUX.1-lite-8B under DeepSpeed ZeRO-2
(rank 0 writes the bf16 weights, the export and its optimizer shard; each other rank its shard).  The
8B line is an estimate for *this* disk: measure on the cluster's file system before choosing the lead
time (README "Long runs").
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FLUX_LITE_PARAMS = 8.16e9  # FLUX.1-lite-8B transformer


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def zero2_rank0_bytes(params: float, world: int) -> float:
    """Bytes rank 0 writes per save under ZeRO-2 bf16: bf16 weights (2 B/param) + the bf16 export (2 B/param)
    + its optimizer shard (fp32 master weights, Adam m and v: 12 B/param over ``world`` ranks)."""
    return params * (2 + 2 + 12 / world)


def measure(saves: int, workdir: Path) -> dict:
    from data.tiny_flux import TinyFluxConfig, build_tiny_dataset, build_tiny_flux_pipeline
    import training.core as core
    from train_sCM import parse_args
    from training.scm import SCMMethod

    config = TinyFluxConfig(num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=64,
                            axes_dims_rope=(16, 24, 24))
    pipe = build_tiny_flux_pipeline(workdir / "pipe", config=config)
    data = build_tiny_dataset(workdir / "data", num_images=16, resolution=32)
    out = workdir / "run"
    args = parse_args(["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data), "--output_dir", str(out),
                       "--timestep_scale", "1000", "--resolution", "32", "--train_batch_size", "2",
                       "--max_train_steps", str(saves), "--checkpointing_steps", "1", "--report_to", "none"])
    durations = []
    real_save = core.save_checkpoint

    def timed_save(run):
        start = time.perf_counter()
        path = real_save(run)
        durations.append(time.perf_counter() - start)
        return path

    core.save_checkpoint = timed_save
    try:
        state = core.train(args, SCMMethod.from_args(args))
    finally:
        core.save_checkpoint = real_save
    params = sum(p.numel() for p in state_params(out, state.step))
    bytes_written = _tree_bytes(out / "checkpoints" / f"checkpoint-{state.step}") + \
        (out / "ckpts" / f"transformer_{state.step}.pt").stat().st_size
    seconds = statistics.median(durations)
    throughput = bytes_written / seconds
    return {"student_params": params, "bytes_per_save": bytes_written, "seconds_per_save_median": seconds,
            "seconds_per_save": durations, "throughput_MB_s": throughput / 1e6,
            "flux_lite_8b_zero2_estimate_s": {str(world): zero2_rank0_bytes(FLUX_LITE_PARAMS, world) / throughput
                                              for world in (8, 16, 64)}}


def state_params(out: Path, step: int):
    import torch

    module = torch.load(out / "ckpts" / f"transformer_{step}.pt", map_location="cpu", weights_only=True)["module"]
    return module.values()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=4, help="Training steps, each followed by a full save.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as tmp:
        result = measure(args.saves, Path(tmp))
    print(f"medium student: {result['student_params'] / 1e6:.2f} M parameters; "
          f"{result['bytes_per_save'] / 1e6:.1f} MB per save; median {result['seconds_per_save_median']:.2f} s per save "
          f"({', '.join(f'{s:.2f}' for s in result['seconds_per_save'])}); {result['throughput_MB_s']:.0f} MB/s")
    for world, seconds in result["flux_lite_8b_zero2_estimate_s"].items():
        print(f"FLUX.1-lite-8B, ZeRO-2 on {world} ranks, at this throughput: ~{seconds:.0f} s per save (rank 0)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
