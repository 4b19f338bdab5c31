"""Training curves from ``logs/metrics.jsonl`` of one or several runs, as one PNG.

    python -m training.plot_metrics RUN_DIR [RUN_DIR ...] --out curves.png
    python -m training.plot_metrics work_dirs/sCM work_dirs/sCM_ema --keys loss_sCM grad_norm g_norm --smooth 50

One panel per metric (default: each run's loss — the first logged key starting with ``loss`` — and
``grad_norm``), one line per run, x = optimizer step.  ``--smooth N`` overlays a trailing mean
of N points on the faint raw curve.  A RUN_DIR may also be the metrics.jsonl file itself.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

Series = dict[str, dict[str, tuple[list[int], list[float]]]]  # metric → run label → (steps, values)


def metrics_file(run: str) -> Path:
    path = Path(run)
    path = path if path.is_file() else path / "logs" / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no logs/metrics.jsonl there; pass a training --output_dir or the file itself")
    return path


def read_records(path: Path) -> list[dict]:
    """Metric lines of one run, by step (a resumed run rewrote its own tail; the last line of a step wins)."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill -9
        if isinstance(record, dict) and "step" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def default_keys(runs: dict[str, list[dict]]) -> list[str]:
    keys: list[str] = []
    for records in runs.values():
        names = records[0].keys() if records else ()
        loss = next((k for k in names if k.startswith("loss")), None)
        if loss and loss not in keys:
            keys.append(loss)
    return keys + ["grad_norm"]


def collect_series(run_dirs: list[str], keys: list[str] | None = None) -> Series:
    """{metric: {run label: (steps, values)}}; runs without a metric are left out of its panel."""
    runs = {}
    for run in run_dirs:
        label = str(run).rstrip("/")
        runs[label] = read_records(metrics_file(run))
    keys = keys or default_keys(runs)
    available = sorted({k for records in runs.values() for r in records for k in r if k != "step"})
    series: Series = {}
    for key in keys:
        if key not in available:
            raise ValueError(f"no run logged {key!r}; available: {', '.join(available)}")
        series[key] = {}
        for label, records in runs.items():
            points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                series[key][label] = ([s for s, _ in points], [v for _, v in points])
    return series


def trailing_mean(values: list[float], n: int) -> list[float]:
    """mean(values[max(0, i − n + 1) .. i]) for every i."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def plot_series(series: Series, smooth: int = 1, log_y: bool = False):
    """A matplotlib Figure with one panel per metric (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.8 * len(series)), sharex=True, squeeze=False)
    for ax, (key, runs) in zip(axes[:, 0], series.items()):
        for i, (label, (steps, values)) in enumerate(runs.items()):
            color = f"C{i % 10}"
            if smooth > 1:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, trailing_mean(values, smooth), color=color, label=label)
            else:
                ax.plot(steps, values, color=color, label=label)
        ax.set_ylabel(key)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.plot_metrics", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Training --output_dir(s) (or metrics.jsonl files).")
    p.add_argument("--out", default="curves.png", help="PNG to write.")
    p.add_argument("--keys", nargs="+", default=None,
                   help="Metrics to plot, one panel each (default: each run's loss and grad_norm).")
    p.add_argument("--smooth", type=int, default=1, help="Trailing mean over N points, drawn over the raw curve.")
    p.add_argument("--log_y", action="store_true", help="Logarithmic y axes.")
    return p


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.smooth < 1:
        raise ValueError(f"--smooth must be >= 1, got {args.smooth}")
    series = collect_series(args.runs, args.keys)
    fig = plot_series(series, args.smooth, args.log_y)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out} ({', '.join(series)} for {len(args.runs)} run(s))")
    return out


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))
