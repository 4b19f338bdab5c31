"""Query-chunk size of the chunked attention tangent (model/attention.py), timed in one process.

    python -m benchmarks.tangent_chunk                                   # medium heads, 1056 and 4608 tokens
    python -m benchmarks.tangent_chunk --tokens 1056 --chunks 64 128 1024 --rounds 9

Each round times ``chunked_attention_tangent`` once per chunk size, in a rotated order, on the same
[B, H, N, D] tensors (B=2, 4 heads × 64: the medium benchmark model; N = 1024 + 32 and 4096 + 512
tokens), so a shared machine's noise hits every size alike.  Reported: median (min–max) over rounds of
the time relative to the largest chunk's time in the same round, on the process CPU-time clock (CPU,
one thread) or the wall clock (CUDA).  The tangents of all chunk sizes agree to rounding (printed).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def time_chunks(tokens: int, chunks: list[int], rounds: int, device: str, heads: int = 4, head_dim: int = 64,
                batch: int = 2) -> dict[int, list[float]]:
    """{chunk: [seconds per round]} of one tangent computation; the first (warm-up) round is dropped."""
    import torch

    from model.attention import chunked_attention_tangent

    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(batch, heads, tokens, head_dim, generator=g).to(device) for _ in range(6))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    cuda = device == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    seconds: dict[int, list[float]] = {c: [] for c in chunks}
    reference = None
    for round_index in range(rounds + 1):
        order = chunks[round_index % len(chunks):] + chunks[:round_index % len(chunks)]
        for chunk in order:
            if cuda:
                torch.cuda.synchronize()
            start = clock()
            with torch.no_grad():
                tangent = chunked_attention_tangent(q, k, v, out, dq, dk, dv, chunk)
            if cuda:
                torch.cuda.synchronize()
            if round_index:
                seconds[chunk].append(clock() - start)
            reference = tangent if reference is None else reference
            assert torch.allclose(tangent, reference, rtol=1e-4, atol=1e-5), f"chunk {chunk} changed the tangent"
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1056, 4608], help="Sequence lengths N (image + text).")
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="Query-chunk sizes.")
    p.add_argument("--rounds", type=int, default=7, help="Timed rounds (each times every chunk size once).")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Device of the tensors.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU).")
    p.add_argument("--json", default=None, help="Also write every timing (seconds per round) to this JSON file.")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    base = max(args.chunks)
    print(f"| N | chunk | ms (median) | time / chunk {base} (median, min–max) |")
    print("|---|---|---|---|")
    results = []
    for tokens in args.tokens:
        seconds = time_chunks(tokens, sorted(args.chunks), args.rounds, args.device)
        results.append({"tokens": tokens, "seconds": {str(c): v for c, v in seconds.items()}})
        for chunk, values in seconds.items():
            ratios = [s / b for s, b in zip(values, seconds[base])]
            print(f"| {tokens} | {chunk} | {1e3 * statistics.median(values):.1f} | {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}–{max(ratios):.2f}) |", flush=True)
    if args.json:
        import json

        config = {k: getattr(args, k) for k in ("chunks", "rounds", "device", "threads")}
        Path(args.json).write_text(json.dumps({"config": config, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
