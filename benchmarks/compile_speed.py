"""Eager vs ``torch.compile`` cost of a student with the JVP attention processor, as ratios in one run.

    python -m benchmarks.compile_speed                         # CPU, medium FLUX, writes compile_speed.json
    python -m benchmarks.compile_speed --device cuda --dtype bf16 --tokens 1024

The student is :class:`~model.transformer.DistillFluxTransformer2DModel` in the "medium" shape (4 heads ×
64, 2 double + 4 single blocks; ``benchmarks.train_step.MEDIUM_ARCH``) with
:func:`~model.attention.set_jvp_attention`, compiled with ``torch.compile`` (inductor, default mode).
Timed, in interleaved rounds (median over rounds; each ratio is compiled / eager of the same round):

* ``forward``  one no-grad forward (one sampling step's transformer call, a teacher forward);
* ``grad``     one forward with gradients + backward (the student's grad pass of a training step);
* ``jvp``      ``torch.func.jvp`` of the velocity along (v, 1) — for the compiled model this runs eagerly
  (dynamo hands frames that see tangents back to eager), so its ratio shows the price of that fallback;
* ``train_step`` = jvp + grad (the two transformer passes of an sCM/MeanFlow micro-batch);
* ``sampling`` a 2-step MeanFlow-style loop z ← z − (t − r)·u (two no-grad forwards + the update).

The first compiled call of each kind (tracing + code generation) is reported as ``compile_s`` and is
not part of the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.train_step import MEDIUM_ARCH  # noqa: E402
from model.attention import set_jvp_attention  # noqa: E402
from model.transformer import DistillFluxTransformer2DModel  # noqa: E402
from model.trigflow import FluxInputs  # noqa: E402

PASSES = ("forward", "grad", "jvp", "sampling")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Device of the model.")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="Weights and activations dtype.")
    p.add_argument("--tokens", type=int, default=256, help="Image tokens (a square number); 32 text tokens are added.")
    p.add_argument("--batch", type=int, default=2, help="Batch size.")
    p.add_argument("--rounds", type=int, default=5, help="Timed rounds (median reported).")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU).")
    p.add_argument("--output", default="compile_speed.json", help="JSON file for the results.")
    args = p.parse_args(argv)
    side = int(round(args.tokens ** 0.5))
    if side * side != args.tokens or args.tokens < 1:
        p.error(f"--tokens must be a positive square number, got {args.tokens}")
    if args.rounds < 1 or args.batch < 1:
        p.error("--rounds and --batch must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def _inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, FluxInputs]:
    g = torch.Generator().manual_seed(0)
    side, n_text = int(round(args.tokens ** 0.5)), 32
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    x = torch.randn(args.batch, args.tokens, MEDIUM_ARCH["in_channels"], generator=g)
    inputs = FluxInputs(torch.randn(args.batch, n_text, MEDIUM_ARCH["joint_attention_dim"], generator=g).to(device, dtype),
                        torch.randn(args.batch, MEDIUM_ARCH["pooled_projection_dim"], generator=g).to(device, dtype),
                        torch.zeros(n_text, 3, device=device), ids.reshape(-1, 3).to(device),
                        torch.full((args.batch,), 3.5, device=device))
    return x.to(device, dtype), inputs


def _passes(velocity, x: torch.Tensor, t: torch.Tensor) -> dict:
    """The timed passes, each a no-argument callable that runs one of them to completion."""
    tangent = (torch.randn_like(x), torch.ones_like(t))

    def forward():
        with torch.no_grad():
            velocity(x, t)

    def grad():
        velocity(x, t).float().square().mean().backward()

    def jvp():
        with torch.no_grad():
            torch.func.jvp(velocity, (x, t), tangent)

    def sampling():
        z = x
        with torch.no_grad():
            for t_now, r in ((1.0, 0.5), (0.5, 0.0)):
                z = z - (t_now - r) * velocity(z, torch.full_like(t, t_now))

    return {"forward": forward, "grad": grad, "jvp": jvp, "sampling": sampling}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    model = DistillFluxTransformer2DModel(**MEDIUM_ARCH, timestep_scale=1.0).to(device, dtype)
    set_jvp_attention(model)
    x, inputs = _inputs(args, device, dtype)
    t = torch.full((args.batch,), 0.7, device=device)

    def velocity(z, s):
        return model(z, timestep=s, **inputs.kwargs(dtype))[0]

    variants = {"eager": _passes(velocity, x, t), "compiled": _passes(torch.compile(velocity), x, t)}
    compile_s = {}
    for name, fn in variants["compiled"].items():  # first calls: tracing + code generation, not timed
        print(f"compiling {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        fn()
        _sync(device)
        compile_s[name] = round(time.perf_counter() - start, 2)
    for fn in variants["eager"].values():
        fn()
    seconds = {v: {p: [] for p in PASSES} for v in variants}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for pass_name in PASSES:
            for variant in variants:  # interleaved so machine noise hits both alike
                model.zero_grad(set_to_none=True)
                _sync(device)
                start = time.perf_counter()
                variants[variant][pass_name]()
                _sync(device)
                seconds[variant][pass_name].append(time.perf_counter() - start)
    for variant in seconds:
        seconds[variant]["train_step"] = [j + g for j, g in zip(seconds[variant]["jvp"], seconds[variant]["grad"])]
    ratios = {p: statistics.median(c / e for c, e in zip(seconds["compiled"][p], seconds["eager"][p]))
              for p in seconds["eager"]}
    return {"device": args.device, "dtype": args.dtype, "arch": "medium (4 heads x 64, 2 double + 4 single blocks)",
            "tokens": args.tokens + 32, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
            "torch": torch.__version__, "compile_s": compile_s,
            "median_s": {v: {p: round(statistics.median(s), 4) for p, s in seconds[v].items()} for v in seconds},
            "compiled_over_eager": {p: round(r, 3) for p, r in ratios.items()}}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print(f"{'pass':<12}{'eager s':>10}{'compiled s':>12}{'compiled/eager':>16}")
    for p, r in results["compiled_over_eager"].items():
        print(f"{p:<12}{results['median_s']['eager'][p]:>10.4f}{results['median_s']['compiled'][p]:>12.4f}{r:>16.3f}")
    print(f"compile time (first call) s: {results['compile_s']}")
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
