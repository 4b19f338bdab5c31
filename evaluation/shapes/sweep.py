"""Choose a student's training schedule (steps, learning rate, LR warm-up) on the validation prompts.

Issue 12: schedules are chosen on a validation prompt set kept apart from the reported one, and the scorer
is never tuned. Every candidate schedule is trained and sampled through the benchmark's own stages
(:func:`evaluation.shapes.benchmark.prepare_stages` — teacher, data, the rescaled teacher, built once —
then :func:`~evaluation.shapes.benchmark.train_student` and :func:`~evaluation.shapes.benchmark.sample_and_score`),
with ``BenchmarkConfig.prompt_set = "validation"``: the sampling CLIs read
``OUT/data/validation_metadata.jsonl`` (:func:`evaluation.shapes.domain.validation_specs`: held out from
training, disjoint from ``heldout_metadata.jsonl``), never the report set. The chosen schedule is the best
validation overall at the target NFE (ties go to the cheaper schedule: fewer steps); the sweep prints the
benchmark command that then reports it on the report set.

Outputs in ``OUT``: ``sweep.json`` (every candidate's scores with 95 % bootstrap intervals over prompts, the
choice, the command), ``sweep.md`` (the table); runs in ``OUT/runs/<method>_<candidate>/``, samples in
``OUT/samples/<method>_<candidate>_nfe<N>/``. Finished stages are skipped when re-run (the benchmark's runner), so an
interrupted sweep resumes and a wider grid trains only the new candidates.

Command line (every benchmark flag is accepted and applies to all candidates)::

    python -m evaluation.shapes.sweep --output_dir OUT --method sCM --steps 300,600,1200 \\
        --learning_rate 5e-5,1e-4,2e-4 --warmup 0,100 [--target_nfe 2] [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from evaluation.shapes import benchmark as B

#: BenchmarkConfig field prefix of each student method.
PREFIX = {"sCM": "scm", "MeanFlow": "meanflow"}
#: The paper's headline step count of each method (sCM at 2 steps, MeanFlow at 4, issue 12's targets).
DEFAULT_TARGET_NFE = {"sCM": 2, "MeanFlow": 4}


@dataclass(frozen=True)
class Candidate:
    """One schedule: optimizer steps, peak learning rate, LR warm-up steps (0: the release's constant LR)."""

    steps: int
    learning_rate: float
    warmup: int = 0

    @property
    def key(self) -> str:
        return f"steps{self.steps}_lr{self.learning_rate:g}_warmup{self.warmup}"

    def config(self, base: B.BenchmarkConfig, method: str) -> B.BenchmarkConfig:
        """``base`` with this schedule for ``method``'s student."""
        p = PREFIX[method]
        return replace(base, **{f"{p}_steps": self.steps, f"{p}_learning_rate": self.learning_rate,
                                f"{p}_lr_warmup_steps": self.warmup})

    def benchmark_flags(self, method: str) -> list[str]:
        p = PREFIX[method]
        return [f"--{p}_steps", str(self.steps), f"--{p}_learning_rate", f"{self.learning_rate:g}",
                f"--{p}_lr_warmup_steps", str(self.warmup)]


def grid(steps: Sequence[int], learning_rates: Sequence[float], warmups: Sequence[int]) -> list[Candidate]:
    """Every combination, cheapest first (steps, then learning rate, then warm-up), duplicates removed."""
    return sorted({Candidate(s, lr, w) for s, lr, w in itertools.product(steps, learning_rates, warmups)},
                  key=lambda c: (c.steps, c.learning_rate, c.warmup))


def choose(rows: Sequence[dict]) -> dict:
    """The row with the best validation ``overall``; ties go to fewer steps, then to the earlier row."""
    if not rows:
        raise ValueError("no candidates to choose from")
    best = min(range(len(rows)), key=lambda i: (-rows[i]["overall"], rows[i]["steps"], i))
    return rows[best]


def run_sweep(out: Path, base: B.BenchmarkConfig, method: str, candidates: Sequence[Candidate], target_nfe: int,
              teacher_dir: Path = B.DEFAULT_TEACHER_DIR, fresh: bool = False, echo: bool = True,
              rebuild_teacher: bool = False) -> dict:
    """Train every candidate, score it on the validation prompts at ``target_nfe``; returns the sweep dict
    (also written to ``OUT/sweep.json`` and ``OUT/sweep.md``) without its benchmark command."""
    from evaluation.shapes.domain import validation_coverage

    if method not in PREFIX:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(PREFIX)}")
    if not candidates:
        raise ValueError("the sweep needs at least one candidate schedule")
    config = replace(base, prompt_set="validation")
    config.validate()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = B.prepare_stages(out, config, Path(teacher_dir).resolve(), rebuild_teacher, fresh, echo)
    if not stages.metadata:
        raise B.BenchmarkError("the validation set is empty: the report set uses every held-out prompt; lower "
                               "--heldout_prompts_per_tag")
    rows = [_run_candidate(stages, method, candidate, target_nfe) for candidate in candidates]
    return {"method": method, "target_nfe": target_nfe, "prompt_set": "validation",
            "validation_metadata": str(stages.heldout), "validation_coverage": validation_coverage(stages.metadata),
            "config": asdict(config), "candidates": rows, "chosen": choose(rows)["key"],
            "commands": [asdict(r) for r in stages.runner.records]}


def _run_candidate(stages: B.Stages, method: str, candidate: Candidate, target_nfe: int) -> dict:
    """Train one schedule with the benchmark's flags and score it on the validation prompts."""
    own = replace(stages, config=candidate.config(stages.config, method))
    # the method is in every name: sweeps of both students may share one OUT (its data and rescaled teacher)
    name = f"{method}_{candidate.key}"
    export = B.train_student(own, method, name, stages.out / "runs" / name)
    row = B.sample_and_score(own, name, target_nfe, [B.SAMPLERS[method], "--resume_path", export],
                             stages.out / "samples" / f"{name}_nfe{target_nfe}")
    return {"key": candidate.key, **asdict(candidate), **row, "export": str(export)}


def format_sweep_table(sweep: dict) -> str:
    """Markdown: one row per candidate, the tasks the validation set covers, overall with its 95 % interval."""
    from evaluation.summarize_geneval import TASKS

    tags = [(tag, title) for tag, title in TASKS if sweep["validation_coverage"].get(tag)]
    header = ["Steps", "LR", "Warm-up"] + [title for _, title in tags] + ["**Overall** [95% CI]", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header[:-1]) + "|---|"]
    for row in sweep["candidates"]:
        low, high = row["overall_interval"]
        cells = [str(row["steps"]), f"{row['learning_rate']:g}", str(row["warmup"])]
        cells += [f"{100 * row['tasks'][tag]:.1f}" for tag, _ in tags]
        cells += [f"**{100 * row['overall']:.1f}** [{100 * low:.1f}, {100 * high:.1f}]",
                  "chosen" if row["key"] == sweep["chosen"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep(out: Path, sweep: dict) -> None:
    coverage = ", ".join(f"{tag} {n}" for tag, n in sweep["validation_coverage"].items())
    text = [f"# Schedule sweep: {sweep['method']} at NFE {sweep['target_nfe']}, validation prompts", "",
            f"Validation prompts per tag: {coverage} (disjoint from the training captions and the report set; "
            "overall = mean over the covered tags).", "", format_sweep_table(sweep), "",
            f"Chosen: `{sweep['chosen']}`. Report it on the report set with:", "", f"    {sweep['benchmark_command']}", ""]
    (out / "sweep.md").write_text("\n".join(text), encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# CLI

#: Sweep-only options (with a value) and run-control switches left out of the printed benchmark command.
_SWEEP_OPTIONS = ("--output_dir", "--method", "--steps", "--learning_rate", "--warmup", "--target_nfe",
                  "--validation_prompts_per_tag")
_DROPPED_SWITCHES = ("--fresh", "--rebuild_teacher")


def _number_list(kind: type, minimum: float):
    def parse(value: str) -> tuple:
        try:
            out = tuple(kind(v) for v in value.replace(",", " ").split())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}s separated by commas, got {value!r}") from exc
        if not out or min(out) < minimum:
            raise argparse.ArgumentTypeError(f"expected values >= {minimum:g}, got {value!r}")
        return out

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = B.build_parser()
    p.prog = "python -m evaluation.shapes.sweep"
    p.description = ("Schedule sweep of one student (issue 12): train every combination of --steps x --learning_rate "
                     "x --warmup through the benchmark's stages, score each on the validation prompts (held out "
                     "from training and disjoint from the reported ones) at --target_nfe, write sweep.json and "
                     "sweep.md, and print the chosen schedule with the benchmark command that reports it. Every "
                     "benchmark flag below applies to all candidates.")
    g = p.add_argument_group("sweep")
    g.add_argument("--method", required=True, choices=list(PREFIX), help="the student whose schedule is swept")
    g.add_argument("--steps", type=_number_list(int, 1), required=True, help="optimizer steps, e.g. 300,600,1200")
    g.add_argument("--learning_rate", type=_number_list(float, 1e-12), required=True,
                   help="peak learning rates, e.g. 5e-5,1e-4,2e-4")
    g.add_argument("--warmup", type=_number_list(int, 0), default=(0,),
                   help="LR warm-up steps (0: the release's constant LR; > 0: constant_with_warmup), e.g. 0,100")
    g.add_argument("--target_nfe", type=int, default=None,
                   help=f"sampling steps the choice is made at (default: {DEFAULT_TARGET_NFE})")
    g.add_argument("--validation_prompts_per_tag", type=int, default=B.BenchmarkConfig().validation_prompts_per_tag,
                   help="validation prompts per tag, at most (tags whose held-out prompts the report set uses up "
                        "get none)")
    return p


def benchmark_command(argv: Sequence[str], method: str, chosen: Candidate, report_dir: Path) -> str:
    """The benchmark command reporting ``chosen`` into ``report_dir``: the sweep's benchmark flags (minus
    sweep-only options, the run-control switches and ``method``'s own schedule flags) plus the chosen schedule."""
    own = {f"--{PREFIX[method]}_{name}" for name in ("steps", "learning_rate", "lr_warmup_steps")}
    skip_with_value = set(_SWEEP_OPTIONS) | own
    kept, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in skip_with_value:
            i += 1 if "=" in argv[i] else 2
            continue
        if name not in _DROPPED_SWITCHES:
            kept.append(argv[i])
        i += 1
    return shlex.join(["python", "-m", "evaluation.shapes.benchmark", "--output_dir", str(report_dir), *kept,
                       *chosen.benchmark_flags(method)])


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.ablations:
        print("error: --ablations belongs to the benchmark run, not to the sweep; drop it here", file=sys.stderr)
        return 2
    try:
        base = replace(B.config_from_args(args), validation_prompts_per_tag=args.validation_prompts_per_tag)
        base.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    target = args.target_nfe or DEFAULT_TARGET_NFE[args.method]
    candidates = grid(args.steps, args.learning_rate, args.warmup)
    out = Path(args.output_dir)
    try:
        sweep = run_sweep(out, base, args.method, candidates, target, Path(args.teacher_dir), args.fresh,
                          echo=not args.quiet, rebuild_teacher=args.rebuild_teacher)
    except B.BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    chosen = next(c for c in candidates if c.key == sweep["chosen"])
    sweep["benchmark_command"] = benchmark_command(argv, args.method, chosen, out / "report")
    write_sweep(out.resolve(), sweep)
    print((out / "sweep.md").read_text(encoding="utf-8"))
    print(f"chosen schedule: {args.method} steps {chosen.steps}, learning rate {chosen.learning_rate:g}, "
          f"warm-up {chosen.warmup}\nreport it with: {sweep['benchmark_command']}")
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
