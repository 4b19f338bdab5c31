"""Benchmark: time and peak memory of the attention JVP, chunked vs PyTorch's MATH kernel.

Each configuration runs in a fresh subprocess. Peak memory is the process's max RSS on CPU, or
``torch.cuda.max_memory_allocated`` on CUDA, minus the memory held before the JVP. Prints a table
and writes JSON.

    python benchmarks/jvp_attention.py --tokens 1024 2048 4096 --json outputs/bench/jvp_attention.json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _measure(impl: str, tokens: int, heads: int, head_dim: int, batch: int, device: str, dtype: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from model.attention import jvp_safe_attention

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    shape = (batch, tokens, heads, head_dim)
    prims = tuple(torch.randn(shape, device=device, dtype=dt) for _ in range(3))
    tans = tuple(torch.randn(shape, device=device, dtype=dt) for _ in range(3))
    fn = lambda q, k, v: jvp_safe_attention(q, k, v, impl)
    with torch.no_grad():
        # ru_maxrss only grows, so the CPU baseline is taken before the warm-up JVP.
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        torch.func.jvp(fn, prims, tans)  # warm-up
        start = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            out, tangent = torch.func.jvp(fn, prims, tans)
        if device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"impl": impl, "tokens": tokens, "seconds": (time.perf_counter() - start) / repeats,
            "peak_extra_bytes": max(peak, 0), "tangent_norm": float(tangent.float().norm())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096], help="Sequence lengths N.")
    p.add_argument("--heads", type=int, default=4, help="Attention heads (FLUX: 24).")
    p.add_argument("--head_dim", type=int, default=128, help="Head dimension (FLUX: 128).")
    p.add_argument("--batch", type=int, default=1, help="Batch size.")
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16.")
    p.add_argument("--json", default=None, help="Write the results here.")
    p.add_argument("--_child", nargs=2, metavar=("IMPL", "TOKENS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        impl, tokens = args._child
        print(json.dumps(_measure(impl, int(tokens), args.heads, args.head_dim, args.batch, args.device, args.dtype)))
        return
    rows = []
    for tokens in args.tokens:
        for impl in ("math", "chunked"):
            cmd = [sys.executable, __file__, "--_child", impl, str(tokens), "--heads", str(args.heads),
                   "--head_dim", str(args.head_dim), "--batch", str(args.batch), "--device", args.device,
                   "--dtype", args.dtype]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    print(f"{'N':>6} {'impl':>8} {'ms':>9} {'peak MiB':>9}   (heads={args.heads}, head_dim={args.head_dim}, "
          f"batch={args.batch}, {args.device}/{args.dtype})")
    for r in rows:
        print(f"{r['tokens']:>6} {r['impl']:>8} {r['seconds'] * 1e3:>9.1f} {r['peak_extra_bytes'] / 2**20:>9.1f}")
    for tokens in args.tokens:
        m, c = (next(r for r in rows if r["tokens"] == tokens and r["impl"] == i) for i in ("math", "chunked"))
        ratio = m["peak_extra_bytes"] / max(c["peak_extra_bytes"], 1)
        print(f"N={tokens}: chunked/math time {c['seconds'] / m['seconds']:.2f}x, math/chunked peak memory {ratio:.1f}x, "
              f"tangent agreement {abs(c['tangent_norm'] - m['tangent_norm']) / m['tangent_norm']:.1e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items() if k != "_child"},
                                               "results": rows}, indent=2))


if __name__ == "__main__":
    main()
