"""Training-step cost per method, as multiples of one teacher forward, with peak memory and images/s.

    python -m benchmarks.train_step                                  # every CPU config (tiny, medium-256/1024, long)
    python -m benchmarks.train_step --configs medium-1024 --rounds 9
    python -m benchmarks.train_step --configs medium-1024 --methods sCM --merged_jvp --rounds 9 --threads 1
    python -m benchmarks.train_step --configs flux-lite-512 flux-lite-1024 --device cuda --dtype bf16   # GPU only
    bash script/benchmark.sh                                         # the same, writing docs/benchmarks/

For each config × method (``rescale``, ``sCM``, ``MeanFlow``, ``MeanFlow+CFG``) a fresh subprocess builds
random teacher and student FLUX transformers through the training code's own classes
(:class:`~model.transformer.DistillFluxTransformer2DModel`, the method's ``build_models`` and loss), then
times, in interleaved rounds so that a noisy, shared machine affects every pass alike:

* ``teacher_fwd``  one no-grad teacher forward on the batch (the unit of every ratio);
* ``jvp``          the method's no-grad JVP of the student (sCM: along (dx_t/dt, 1); MeanFlow: (v, 0, 1));
* ``grad``         one student forward with gradients + backward;
* ``step``         the whole method loss + backward (what one training micro-batch costs);
* ``step_merged``  with ``--merged_jvp``, sCM only: the same step with ``SCMLossConfig(merged_jvp=True)``
                   (F_θ and dF/dt from one forward-mode pass, training/scm.py), timed in the same rounds as
                   ``step``; the row then also gives merged / two-pass step time per round and the merged
                   step's peak memory.

Each ratio is pass time / teacher-forward time *of the same round*; the table gives the median over
rounds and the spread (min–max).  Odd rounds run the passes in reverse order, so no pass always follows
the same one.  Peak memory is measured on one step after a warm-up step (optimizer
state allocated): CPU reads the kernel's peak-RSS counter (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the step; large allocations go through mmap so frees are returned at
once), CUDA reads ``torch.cuda.max_memory_allocated``.  Memory columns: ``resident`` = weights (teacher
+ student), Adam state before the step; ``peak`` = the highest total during loss + backward + optimizer
step; both over the process's memory before any model was built.

Configs (FLUX MMDiT shapes; tokens = image + text): ``tiny`` (2 heads × 8, 1 + 1 blocks, 64 + 8),
``medium-256`` / ``medium-1024`` (4 heads × 64, 2 double + 4 single blocks, 256 + 32 / 1024 + 32),
``long`` (the medium model at 4096 + 512 tokens, the 1024² case: memory and one timed round),
``flux-lite-512`` / ``flux-lite-1024`` (FLUX.1-lite-8B: 24 heads × 128, 8 double + 38 single blocks,
1024 + 512 / 4096 + 512 tokens; CUDA only, skipped with a message elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from training.memory_plan import FLUX_LITE_8B as FLUX_LITE_ARCH  # noqa: E402

MEDIUM_ARCH = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                   joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 28, 28))
TINY_ARCH = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


@dataclass(frozen=True)
class BenchConfig:
    name: str
    arch: dict
    image_tokens: int
    text_tokens: int
    batch: int = 2
    gpu_only: bool = False
    timing_rounds: int | None = None  # None: --rounds; the long config times a single round on CPU

    @property
    def side(self) -> int:
        side = int(round(self.image_tokens ** 0.5))
        if side * side != self.image_tokens:
            raise ValueError(f"{self.name}: image_tokens must be a square number, got {self.image_tokens}")
        return side


CONFIGS = {c.name: c for c in (
    BenchConfig("tiny", TINY_ARCH, 64, 8),
    BenchConfig("medium-256", MEDIUM_ARCH, 256, 32),
    BenchConfig("medium-1024", MEDIUM_ARCH, 1024, 32),
    BenchConfig("long", MEDIUM_ARCH, 4096, 512, timing_rounds=1),
    BenchConfig("flux-lite-512", FLUX_LITE_ARCH, 1024, 512, batch=1, gpu_only=True),
    BenchConfig("flux-lite-1024", FLUX_LITE_ARCH, 4096, 512, batch=1, gpu_only=True),
)}
CPU_CONFIGS = ("tiny", "medium-256", "medium-1024", "long")
METHODS = ("rescale", "sCM", "MeanFlow", "MeanFlow+CFG")
PASSES = ("teacher_fwd", "jvp", "grad", "step", "step_merged")


# ---------------------------------------------------------------------------------------------- memory
def _status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


class PeakMemory:
    """Peak bytes of one code region: CUDA allocator statistics, or the kernel's peak RSS on Linux CPUs."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def current(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated()
        return _status_bytes("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")


# ------------------------------------------------------------------------------------------ one method
@dataclass
class Harness:
    """Models, inputs and the four timed passes of one method (built in the child process)."""

    teacher_fwd: object
    jvp: object | None
    grad: object
    step: object
    params: list = field(default_factory=list)
    step_merged: object | None = None  # sCM with --merged_jvp: the step through one forward-mode pass


def _inputs(config: BenchConfig, device, dtype, seed: int = 0):
    import torch

    from model.trigflow import FluxInputs

    g = torch.Generator().manual_seed(seed)
    arch, b, side = config.arch, config.batch, config.side
    latents = torch.randn(b, side * side, arch["in_channels"], generator=g)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = FluxInputs(torch.randn(b, config.text_tokens, arch["joint_attention_dim"], generator=g).to(device, dtype),
                        torch.randn(b, arch["pooled_projection_dim"], generator=g).to(device, dtype),
                        torch.zeros(config.text_tokens, 3, device=device), ids.reshape(-1, 3).to(device),
                        torch.full((b,), 4.5, device=device))
    return latents.to(device), inputs


def _transformers(config: BenchConfig, device, dtype, timestep_scale: float):
    import torch

    from model.transformer import DistillFluxTransformer2DModel

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(DistillFluxTransformer2DModel(**config.arch, timestep_scale=timestep_scale).to(device, dtype))
    return models


def build_harness(method: str, config: BenchConfig, device, dtype, merged_jvp: bool = False) -> Harness:
    import torch

    from model.trigflow import flow_velocity
    from training.meanflow import MeanFlowLoss, MeanFlowLossConfig, MeanFlowMethod, UncondEmbedding
    from training.rescale import RescaleLoss, RescaleLossConfig, RescaleMethod
    from training.scm import SCMLoss, SCMLossConfig, SCMMethod

    latents, inputs = _inputs(config, device, dtype)
    b = config.batch
    teacher_tf, student_tf = _transformers(config, device, dtype, 1000.0 if method == "rescale" else 1.0)
    t = torch.full((b,), 0.6, device=device)
    r = torch.full((b,), 0.2, device=device)  # MeanFlow: r < t, the rows that need the JVP correction
    if method == "rescale":
        m = RescaleMethod(RescaleLoss(RescaleLossConfig()))
    elif method == "sCM":
        m = SCMMethod(SCMLoss(SCMLossConfig()))
    else:
        cfg = MeanFlowLossConfig(use_cfg_meanflow=method == "MeanFlow+CFG", cfg_omega=1.0, cfg_kappa=0.5)
        m = MeanFlowMethod(MeanFlowLoss(cfg), None)
        g = torch.Generator().manual_seed(7)
        m.uncond = UncondEmbedding(torch.randn(1, config.text_tokens, config.arch["joint_attention_dim"], generator=g),
                                   torch.randn(1, config.arch["pooled_projection_dim"], generator=g)).to(device)
    student, teacher = m.build_models(argparse.Namespace(), teacher_tf, student_tf)
    student.to(device).train()
    teacher.requires_grad_(False).eval()
    params = [p for p in student.parameters() if p.requires_grad]

    def teacher_fwd():
        with torch.no_grad():
            return flow_velocity(teacher_tf, latents, t, inputs)

    def grad():
        if method == "rescale":
            out = flow_velocity(student, latents, t, inputs)
        elif method == "sCM":
            F_theta, logvar = student(latents, t, inputs, return_logvar=True)
            out = F_theta + logvar.reshape(-1, 1, 1)
        else:
            out = student(latents, r, t, inputs)
        (out.float().square().mean()).backward()

    if method == "sCM":
        tangents = (torch.randn_like(latents), torch.ones_like(t))

        def jvp():
            with torch.no_grad():
                return torch.func.jvp(lambda x, tt: student(x, tt, inputs), (latents, t), tangents)

        def step():
            m.loss(student, student, teacher, latents, inputs, 10 ** 6).loss.backward()

        merged = SCMLoss(SCMLossConfig(merged_jvp=True))

        def step_merged():
            merged(student, student, teacher, latents, inputs, 10 ** 6).loss.backward()
    elif method.startswith("MeanFlow"):
        tangents = (torch.randn_like(latents), torch.zeros_like(r), torch.ones_like(t))
        no_drop = torch.zeros(b, dtype=torch.bool, device=device)

        def jvp():
            with torch.no_grad():
                return torch.func.jvp(lambda z, rr, tt: student(z, rr, tt, inputs), (latents, r, t), tangents)

        def step():
            m.loss_fn(student, student, teacher, latents, inputs, m.uncond, drop=no_drop).loss.backward()
    else:
        jvp = None

        def step():
            m.loss(student, student, teacher, latents, inputs, 0).loss.backward()

    return Harness(teacher_fwd, jvp, grad, step, params,
                   step_merged if merged_jvp and method == "sCM" else None)


def _clear_grads(params) -> None:
    for p in params:
        p.grad = None


def measure(method: str, config: BenchConfig, device: str, dtype_name: str, rounds: int, threads: int,
            clock: str = "wall", merged_jvp: bool = False) -> dict:
    import torch

    now = time.process_time if clock == "process" else time.perf_counter
    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    import model.transformer  # noqa: F401  (imports before the baseline: only models and tensors are counted)
    import training.meanflow  # noqa: F401
    import training.rescale  # noqa: F401
    import training.scm  # noqa: F401

    memory = PeakMemory(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    base = memory.current()
    h = build_harness(method, config, device, dtype, merged_jvp)
    optimizer = torch.optim.AdamW(h.params, lr=1e-6)

    def train_step(step=h.step):
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up: allocates the Adam state
    sync()
    resident = memory.current() - base
    memory.reset()
    train_step()
    peak = memory.peak() - base
    extra = {}
    if h.step_merged is not None:
        memory.reset()
        train_step(h.step_merged)
        extra["peak_merged_bytes"] = memory.peak() - base

    passes = {name: getattr(h, name) for name in PASSES if getattr(h, name) is not None}
    seconds = {name: [] for name in passes}
    for round_index in range(1 + (config.timing_rounds or rounds)):  # round 0 is a warm-up
        for name, fn in list(passes.items())[::-1 if round_index % 2 else 1]:
            sync()
            start = now()
            fn()
            sync()
            if round_index:
                seconds[name].append(now() - start)
            _clear_grads(h.params)
    ratios = {name: [s / t for s, t in zip(values, seconds["teacher_fwd"])] for name, values in seconds.items()}
    step_s = statistics.median(seconds["step"])
    if "step_merged" in seconds:  # A/B of the same rounds: merged / two-pass step time
        ab = [m / s for m, s in zip(seconds["step_merged"], seconds["step"])]
        extra["merged_over_two_pass"] = {"median": statistics.median(ab), "min": min(ab), "max": max(ab)}
    return {"config": config.name, "method": method, "device": device, "dtype": dtype_name, "threads": threads,
            "clock": clock,
            "batch": config.batch, "image_tokens": config.image_tokens, "text_tokens": config.text_tokens,
            "rounds": len(seconds["teacher_fwd"]), "seconds": seconds,
            "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
            "ratio_min": {k: min(v) for k, v in ratios.items()}, "ratio_max": {k: max(v) for k, v in ratios.items()},
            "teacher_fwd_ms": 1e3 * statistics.median(seconds["teacher_fwd"]), "step_ms": 1e3 * step_s,
            "images_per_s": config.batch / step_s, "resident_bytes": resident, "peak_bytes": peak, **extra}


# --------------------------------------------------------------------------------------------- driver
def _child(method: str, config: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--_child", method, config, "--device", args.device,
           "--dtype", args.dtype, "--rounds", str(args.rounds), "--threads", str(args.threads), "--clock", args.clock]
    if getattr(args, "merged_jvp", False):
        cmd.append("--merged_jvp")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {method} / {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def planned_peak_bytes(config: BenchConfig, method: str, dtype_name: str) -> float:
    """training.memory_plan's total for this config on one process (no DeepSpeed, no text encoders)."""
    from training.memory_plan import RunShape, plan_memory

    shape = RunShape(dict(config.arch), resolution=config.side * 16, batch=config.batch, num_gpus=1, zero_stage=0,
                     precision="bf16" if dtype_name == "bf16" else "fp32", method=method, conditioning_cache=True,
                     max_sequence_length=config.text_tokens, bucket_elements=0)
    return plan_memory(shape).total


def _fmt_ratio(row: dict, name: str) -> str:
    if name not in row["ratio_median"]:
        return "–"
    return f"{row['ratio_median'][name]:.2f}× ({row['ratio_min'][name]:.2f}–{row['ratio_max'][name]:.2f})"


def markdown_table(rows: list[dict], baseline: list[dict] | None = None) -> str:
    """One line per config × method; with ``baseline``, a 'step before' column from that JSON's rows."""
    before = {(r["config"], r["method"]): r for r in baseline or []}
    head = ["config", "tokens", "method", "teacher fwd ms", "JVP", "grad (fwd+bwd)", "step", "images/s",
            "resident MiB", "peak MiB", "plan MiB"]
    if before:
        head.insert(7, "step before")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], f"{r['image_tokens']}+{r['text_tokens']}", r["method"], f"{r['teacher_fwd_ms']:.1f}",
                 _fmt_ratio(r, "jvp"), _fmt_ratio(r, "grad"), _fmt_ratio(r, "step"), f"{r['images_per_s']:.2f}",
                 f"{r['resident_bytes'] / 2**20:.0f}", f"{r['peak_bytes'] / 2**20:.0f}",
                 f"{r['plan_bytes'] / 2**20:.0f} ({r['plan_bytes'] / r['peak_bytes'] - 1:+.0%})" if r.get("plan_bytes") else "–"]
        if before:
            old = before.get((r["config"], r["method"]))
            cells.insert(7, _fmt_ratio(old, "step") if old else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merged_lines(rows: list[dict]) -> str:
    """With --merged_jvp: one line per sCM row, merged / two-pass step time (same rounds) and both peaks."""
    lines = []
    for r in rows:
        if "merged_over_two_pass" in r:
            ab = r["merged_over_two_pass"]
            lines.append(f"* {r['config']} sCM, --merged_jvp: step {_fmt_ratio(r, 'step_merged')} of a teacher "
                         f"forward; merged / two-pass step time {ab['median']:.3f} ({ab['min']:.3f}–{ab['max']:.3f}) over "
                         f"{r['rounds']} rounds; peak {r['peak_merged_bytes'] / 2**20:.0f} MiB (two-pass "
                         f"{r['peak_bytes'] / 2**20:.0f} MiB)")
    return "\n\n" + "\n".join(lines) if lines else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS),
                   help=f"Configs to run (default: {' '.join(CPU_CONFIGS)} on CPU, every config on CUDA).")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="Methods to run.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Device of the models.")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="Weights and activations dtype.")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU).")
    p.add_argument("--clock", choices=["wall", "process"], default=None,
                   help="wall: elapsed time; process: this process's CPU time, which other processes on a shared "
                        "CPU machine barely disturb (use it with --threads 1). Default: wall on CUDA, process on CPU.")
    p.add_argument("--rounds", type=int, default=7,
                   help="Timed rounds (each times every pass once); ratios are medians over rounds.")
    p.add_argument("--output_dir", default=None,
                   help="Write train_step.json and train_step.md here (script/benchmark.sh: docs/benchmarks).")
    p.add_argument("--baseline", default=None,
                   help="A previous train_step.json: its step ratios are shown beside the new ones.")
    p.add_argument("--merged_jvp", action="store_true",
                   help="sCM rows also time the step through train_sCM.py --merged_jvp, interleaved with the two-pass "
                        "step in the same rounds, and report merged / two-pass step time and the merged peak memory.")
    p.add_argument("--_child", nargs=2, metavar=("METHOD", "CONFIG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible here; run on a GPU machine or use --device cpu")
    if args.clock is None:
        args.clock = "wall" if args.device == "cuda" else "process"
    if args.clock == "process" and args.device == "cuda":
        p.error("--clock process measures CPU time, not GPU work: use --clock wall with --device cuda")
    if args.baseline and not Path(args.baseline).is_file():
        p.error(f"--baseline {args.baseline} is not a file (a train_step.json written by an earlier run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._child:
        method, name = args._child
        print(json.dumps(measure(method, CONFIGS[name], args.device, args.dtype, args.rounds, args.threads,
                                 args.clock, args.merged_jvp)))
        return 0
    names = args.configs or (CPU_CONFIGS if args.device == "cpu" else tuple(CONFIGS))
    rows, skipped = [], []
    jobs = [(n, m) for n in names for m in args.methods]
    from tqdm.auto import tqdm

    for name, method in tqdm(jobs, desc="benchmark", unit="run"):
        if CONFIGS[name].gpu_only and args.device != "cuda":
            if name not in skipped:
                skipped.append(name)
                print(f"skipping {name}: a FLUX.1-lite-sized model needs a GPU (--device cuda); not measured here",
                      file=sys.stderr)
            continue
        row = _child(method, name, args)
        row["plan_bytes"] = planned_peak_bytes(CONFIGS[name], method, args.dtype)
        rows.append(row)
    baseline = json.loads(Path(args.baseline).read_text())["results"] if args.baseline else None
    table = markdown_table(rows, baseline) + merged_lines(rows)
    print(table)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        import platform

        import torch

        meta = {"device": args.device, "dtype": args.dtype, "threads": args.threads, "rounds": args.rounds,
                "clock": args.clock,
                "torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg(), "skipped": skipped,
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        (out / "train_step.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        note = (f"{args.device}/{args.dtype}, {args.threads} threads, {args.clock} clock, median (min–max) of {args.rounds} interleaved "
                f"rounds, {meta['when']}, load average at the end {meta['load_average'][0]:.1f}. Ratios are multiples "
                "of one no-grad teacher forward of the same round.")
        if skipped:
            note += f" Not measured here (GPU only): {', '.join(skipped)}."
        (out / "train_step.md").write_text(f"# Training-step benchmark\n\n{note}\n\n{table}\n")
        print(f"wrote {out / 'train_step.json'} and {out / 'train_step.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
