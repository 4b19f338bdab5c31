"""Summarise a GenEval results jsonl into the numbers the GenEval paper reports.

The results file is what GenEval's ``evaluate_images.py`` (or our shapes scorer) writes: one JSON
object per image with at least ``tag``, ``correct`` and ``metadata`` (the prompt's metadata as a
JSON string; ``prompt`` is used when ``metadata`` is absent). The summary follows GenEval's own
``summary_scores.py`` definitions:

* total images, total prompts (distinct ``metadata`` strings),
* % correct images, % prompts with at least one correct image,
* per-task accuracy = fraction of correct images of that tag,
* overall = unweighted mean of the task accuracies (GenEval: "avg. over tasks").

Usage::

    python -m evaluation.summarize_geneval results.jsonl [--metadata evaluation/evaluation_metadata.jsonl] [--json summary.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Union

#: The six GenEval tasks in the column order of the paper's table, with their column titles.
TASKS: tuple[tuple[str, str], ...] = (
    ("single_object", "Single obj."),
    ("two_object", "Two obj."),
    ("counting", "Counting"),
    ("colors", "Colors"),
    ("position", "Position"),
    ("color_attr", "Color attr."),
)
TASK_TAGS = tuple(tag for tag, _ in TASKS)


def _canonical(metadata: Any) -> str:
    """A key identifying one prompt specification regardless of JSON formatting/key order."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            return metadata
    return json.dumps(metadata, sort_keys=True)


def _as_bool(value: Any, lineno: int) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"results line {lineno}: 'correct' must be a boolean, got {value!r}")


def load_results(results_jsonl: Union[str, Path]) -> list[dict[str, Any]]:
    """Read a results jsonl (blank lines ignored); each row needs ``tag`` and ``correct``."""
    rows = []
    if not Path(results_jsonl).is_file():
        raise FileNotFoundError(f"results file not found: {results_jsonl} (GenEval's evaluate_images.py or "
                                "python -m evaluation.shapes.scorer writes it)")
    with open(results_jsonl, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{results_jsonl}:{lineno}: not valid JSON ({exc.msg}); is it a results jsonl "
                                 "(one JSON object per image)?") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{results_jsonl}:{lineno}: expected a JSON object per line, got "
                                 f"{type(row).__name__}")
            for key in ("tag", "correct"):
                if key not in row:
                    raise ValueError(f"{results_jsonl}:{lineno}: result row has no {key!r}")
            if "metadata" not in row and "prompt" not in row:
                raise ValueError(f"{results_jsonl}:{lineno}: result row has neither 'metadata' nor 'prompt'")
            row["correct"] = _as_bool(row["correct"], lineno)
            rows.append(row)
    return rows


def summarize_rows(
    rows: Iterable[dict[str, Any]],
    metadata: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """Summary dict of already-loaded result rows (see :func:`summarize`)."""
    rows = list(rows)
    if not rows:
        raise ValueError("no result rows to summarise")
    prompt_any: dict[str, bool] = {}
    per_tag: dict[str, list[int]] = {}
    for row in rows:
        key = _canonical(row["metadata"]) if "metadata" in row else _canonical({"prompt": row["prompt"]})
        prompt_any[key] = prompt_any.get(key, False) or row["correct"]
        counts = per_tag.setdefault(row["tag"], [0, 0])
        counts[0] += int(row["correct"])
        counts[1] += 1

    tasks = {
        tag: {"correct": c, "total": n, "accuracy": c / n}
        for tag, (c, n) in per_tag.items()
    }
    present = [tag for tag in TASK_TAGS if tag in tasks]
    missing_tasks = [tag for tag in TASK_TAGS if tag not in tasks]
    unknown_tasks = [tag for tag in tasks if tag not in TASK_TAGS]
    overall = sum(tasks[t]["accuracy"] for t in present) / len(present) if present else float("nan")
    n_images = len(rows)
    summary: dict[str, Any] = {
        "total_images": n_images,
        "total_prompts": len(prompt_any),
        "correct_images": sum(int(r["correct"]) for r in rows) / n_images,
        "correct_prompts": sum(prompt_any.values()) / len(prompt_any),
        "tasks": tasks,
        "overall": overall,
        "missing_tasks": missing_tasks,
        "unknown_tasks": unknown_tasks,
    }
    if metadata is not None:
        expected = {_canonical(m) for m in metadata}
        absent = sorted(json.loads(k)["prompt"] for k in expected - set(prompt_any))
        summary["expected_prompts"] = len(expected)
        summary["missing_prompts"] = absent
    return summary


def summarize(
    results_jsonl: Union[str, Path],
    metadata: Union[None, str, Path, list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """Turn a GenEval results jsonl into GenEval's summary.

    Returns a dict whose rates are fractions in [0, 1]::

        {"total_images": int, "total_prompts": int,
         "correct_images": float,   # share of images judged correct
         "correct_prompts": float,  # share of prompts with at least one correct image
         "tasks": {tag: {"correct": int, "total": int, "accuracy": float}},
         "overall": float,          # unweighted mean over the six GenEval tasks present
         "missing_tasks": [...], "unknown_tasks": [...],
         # only when ``metadata`` (a jsonl path or list of dicts) is given:
         "expected_prompts": int, "missing_prompts": [prompt, ...]}

    Warns (``UserWarning``) when fewer distinct prompts were scored than ``metadata`` has, and
    when one of the six tasks is absent (the overall score is then a mean over fewer tasks).
    """
    if metadata is not None and not isinstance(metadata, list):
        from evaluation.geneval_layout import read_metadata

        if not Path(metadata).is_file():
            raise FileNotFoundError(f"--metadata file not found: {metadata} (e.g. evaluation/evaluation_metadata.jsonl)")
        metadata = read_metadata(metadata)
    summary = summarize_rows(load_results(results_jsonl), metadata)
    if metadata is not None and summary["missing_prompts"]:
        shown = ", ".join(repr(p) for p in summary["missing_prompts"][:5])
        more = len(summary["missing_prompts"]) - 5
        warnings.warn(
            f"only {summary['total_prompts']} distinct prompts were scored but the metadata has "
            f"{summary['expected_prompts']}; missing: {shown}" + (f" and {more} more" if more > 0 else "")
            + " — GenEval skips missing folders silently, so this score is not comparable",
            stacklevel=2,
        )
    if summary["missing_tasks"]:
        warnings.warn(
            f"tasks without any result: {', '.join(summary['missing_tasks'])}; "
            "'overall' averages only the tasks present",
            stacklevel=2,
        )
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Markdown table in the paper's column order, percentages with two decimals."""
    header = [title for _, title in TASKS] + ["Overall"]
    cells = []
    for tag, _ in TASKS:
        task = summary["tasks"].get(tag)
        cells.append(f"{100 * task['accuracy']:.2f}" if task else "—")
    cells.append(f"{100 * summary['overall']:.2f}")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
        "| " + " | ".join(cells) + " |",
    ]
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """Totals block plus the task table, as printed by the CLI."""
    lines = [
        f"Total images: {summary['total_images']}",
        f"Total prompts: {summary['total_prompts']}"
        + (f" (expected {summary['expected_prompts']})" if "expected_prompts" in summary else ""),
        f"% correct images: {100 * summary['correct_images']:.2f}",
        f"% correct prompts: {100 * summary['correct_prompts']:.2f}",
        "",
        format_table(summary),
        "",
    ]
    for tag, task in summary["tasks"].items():
        lines.append(f"{tag:<16} {100 * task['accuracy']:6.2f}% ({task['correct']} / {task['total']})")
    lines.append(f"Overall score (avg. over tasks): {summary['overall']:.5f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.summarize_geneval",
        description="Summarise a GenEval results jsonl (per-task accuracy and overall score).",
    )
    parser.add_argument("results", help="results jsonl written by GenEval's evaluate_images.py or evaluation.shapes.scorer")
    parser.add_argument(
        "--metadata", default=None,
        help="metadata jsonl the images were generated from (e.g. evaluation/evaluation_metadata.jsonl); "
        "warns when prompts are missing from the results",
    )
    parser.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON to this path")
    args = parser.parse_args(argv)
    from training.cli import run_cli

    return run_cli(lambda: report_summary(args.results, args.metadata, args.json_out))


def report_summary(results, metadata=None, json_out=None) -> dict:
    """Summarise a results jsonl, print the per-task table and optionally write it as JSON."""
    summary = summarize(results, metadata)
    print(format_summary(summary))
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    sys.exit(main())
