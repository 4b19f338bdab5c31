"""Why position and counting prompts fail: a breakdown of a scored sample folder (its ``results.jsonl``).

The overall score says *that* a model fails a task; the teacher build needs to know *how*. For each
position image the objects the scorer matched are re-read from the row's ``details`` and put in one class:

* ``objects missing``: an object the prompt names (shape and colour) was not drawn, so no relation can hold;
* ``correct`` / ``opposite`` / ``other axis`` / ``no relation``: both were drawn, and the subject stands in
  the asked relation to the reference, in the opposite one (left ↔ right, above ↔ below), only in one of
  the other axis, or too close to either (GenEval's box rule, :func:`~evaluation.shapes.domain.relative_position`).

Among the images with both objects it also gives the **relation-blind rate**: the mean over the four
relations of how often each holds for the drawn layout. It is what the asked relation would score if the
model placed the objects without reading the relation word; a model that reads it scores well above it.

For counting images: ``too few`` / ``exact`` / ``too many`` objects of the named shape and colour (the scorer
also fails an exact image holding one more of the shape in another colour, GenEval's ``exclude`` rule).

CLI::

    python -m evaluation.shapes.failures SAMPLES_DIR [SAMPLES_DIR ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

from evaluation.shapes.domain import POSITION_THRESHOLD, relative_position
from evaluation.shapes.stats import read_results

RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
POSITION_CLASSES = ("correct", "opposite", "other axis", "no relation", "objects missing")
COUNTING_CLASSES = ("exact", "too few", "too many")


def _matching(details: dict, spec: dict) -> list[dict]:
    """Detections of ``spec``'s class (and colour when given), largest first, as the scorer orders them."""
    found = [d for d in details.get(spec["class"], []) if spec.get("color") in (None, d["color"])]
    return sorted(found, key=lambda d: (-d["area"], d["box"]))


def position_class(metadata: dict, details: dict, threshold: float = POSITION_THRESHOLD) -> tuple[str, Optional[set]]:
    """(class, relations of the subject to the reference) of one position image; relations None when an
    object is missing."""
    reference, subject = metadata["include"][0], metadata["include"][1]
    relation = subject["position"][0]
    ref, subj = _matching(details, reference), _matching(details, subject)
    if not ref or not subj:
        return "objects missing", None
    held = relative_position(subj[0]["box"], ref[0]["box"], threshold)
    if relation in held:
        return "correct", held
    if OPPOSITE[relation] in held:
        return "opposite", held
    return ("other axis" if held else "no relation"), held


def counting_class(metadata: dict, details: dict) -> str:
    spec = metadata["include"][0]
    n = len(_matching(details, spec))
    return "exact" if n == int(spec["count"]) else ("too few" if n < int(spec["count"]) else "too many")


def breakdown(rows: Iterable[dict], threshold: float = POSITION_THRESHOLD) -> dict:
    """Counts per class for the position and counting rows of a results jsonl, and the relation-blind rate."""
    position, counting = Counter(), Counter()
    blind = []
    for row in rows:
        metadata, details = json.loads(row["metadata"]), json.loads(row["details"])
        if row["tag"] == "position":
            name, held = position_class(metadata, details, threshold)
            position[name] += 1
            if held is not None:
                blind.append(sum(r in held for r in RELATIONS) / len(RELATIONS))
        elif row["tag"] == "counting":
            counting[counting_class(metadata, details)] += 1
    drawn = sum(position[c] for c in POSITION_CLASSES[:-1])
    return {
        "position": {c: position[c] for c in POSITION_CLASSES},
        "position_images": sum(position.values()),
        "both_objects_drawn": drawn,
        "relation_correct_given_objects": position["correct"] / drawn if drawn else None,
        "relation_blind_rate": sum(blind) / len(blind) if blind else None,
        "counting": {c: counting[c] for c in COUNTING_CLASSES},
        "counting_images": sum(counting.values()),
    }


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def format_breakdown(named: Sequence[tuple[str, dict]]) -> str:
    """Markdown table, one row per sample folder."""
    header = (["samples", "position imgs"] + list(POSITION_CLASSES) + ["relation right, both drawn (%)",
              "relation-blind rate (%)", "counting imgs"] + list(COUNTING_CLASSES))
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, b in named:
        cells = [name, str(b["position_images"])] + [str(b["position"][c]) for c in POSITION_CLASSES]
        cells += [_pct(b["relation_correct_given_objects"]), _pct(b["relation_blind_rate"]), str(b["counting_images"])]
        cells += [str(b["counting"][c]) for c in COUNTING_CLASSES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.shapes.failures", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("samples", nargs="+", type=Path, help="scored sample folders (each with its results.jsonl)")
    p.add_argument("--position_threshold", type=float, default=POSITION_THRESHOLD, help="GenEval's box-rule slack")
    p.add_argument("--json", type=Path, default=None, help="also write every breakdown here")
    args = p.parse_args(argv)
    named = [(folder.name, breakdown(read_results(folder), args.position_threshold)) for folder in args.samples]
    print(format_breakdown(named))
    if args.json:
        args.json.write_text(json.dumps(dict(named), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
