"""The failure breakdown (evaluation/shapes/failures.py) on hand-drawn scenes scored by the real scorer."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from evaluation.shapes import domain, failures, scorer
from evaluation.shapes.stats import read_results


def _row(tmp_path, objects, spec):
    """Score a 64² image holding ``objects`` = [(shape, colour, x, y)] (size 16) against ``spec``."""
    image = Image.new("RGB", (64, 64), domain.BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape, color, x, y in objects:
        domain._draw(draw, shape, x, y, 16, domain.PALETTE[color])
    path = tmp_path / f"{len(list(tmp_path.iterdir())):03d}.png"
    image.save(path)
    return scorer.score_image(path, spec)


SIDE_BY_SIDE = [("square", "red", 6, 24), ("circle", "blue", 42, 24)]  # red square left, blue circle right
DIAGONAL = [("square", "red", 4, 4), ("circle", "blue", 44, 44)]  # blue circle below and right of the square


@pytest.mark.parametrize("relation, expected", [("right of", "correct"), ("left of", "opposite"),
                                                ("above", "other axis"), ("below", "other axis")])
def test_position_classes_side_by_side(tmp_path, relation, expected):
    spec = domain.make_spec("position", "circle", "blue", relation, "square", "red")
    row = _row(tmp_path, SIDE_BY_SIDE, spec)
    assert row["correct"] == (expected == "correct")  # the breakdown agrees with the scorer's verdict
    name, held = failures.position_class(json.loads(row["metadata"]), json.loads(row["details"]))
    assert (name, held) == (expected, {"right of"})


def test_missing_object_and_relation_blind_rate(tmp_path):
    rows = [
        _row(tmp_path, SIDE_BY_SIDE, domain.make_spec("position", "circle", "blue", "left of", "square", "red")),
        _row(tmp_path, DIAGONAL, domain.make_spec("position", "circle", "blue", "below", "square", "red")),
        _row(tmp_path, SIDE_BY_SIDE, domain.make_spec("position", "triangle", "green", "above", "square", "red")),
    ]
    b = failures.breakdown(rows)
    assert b["position"] == {"correct": 1, "opposite": 1, "other axis": 0, "no relation": 0, "objects missing": 1}
    assert b["both_objects_drawn"] == 2 and b["relation_correct_given_objects"] == pytest.approx(0.5)
    # side by side: 1 of the 4 relations holds; diagonal: 2 (below and right of) -> mean of 1/4 and 2/4
    assert b["relation_blind_rate"] == pytest.approx((0.25 + 0.5) / 2)


@pytest.mark.parametrize("drawn, expected", [(1, "too few"), (2, "exact"), (3, "too many")])
def test_counting_classes(tmp_path, drawn, expected):
    spec = domain.make_spec("counting", "circle", "yellow", 2)
    row = _row(tmp_path, [("circle", "yellow", 2 + 21 * i, 24) for i in range(drawn)], spec)
    assert row["correct"] == (expected == "exact")
    assert failures.breakdown([row])["counting"][expected] == 1


def test_ground_truth_renders_are_all_correct(tmp_path):
    specs = [s for s in domain.heldout_specs(4, seed=0) if s["tag"] in ("position", "counting")]
    folder = domain.write_reference_folder(specs, tmp_path / "gt", n_samples=2)
    scorer.score_folder(folder, folder / "results.jsonl")
    b = failures.breakdown(read_results(folder))
    assert b["position"]["correct"] == b["position_images"] == 8
    assert b["counting"]["exact"] == b["counting_images"] == 8
    assert b["relation_blind_rate"] < 1.0  # a layout satisfies 1-2 of the 4 relations, never all
    table = failures.format_breakdown([("gt", b)])
    assert table.count("\n") == 2 and "| gt | 8 | 8 |" in table


def test_cli_reports_a_missing_results_file(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="score the folder first"):
        failures.main([str(tmp_path)])
    np.testing.assert_equal(list(tmp_path.iterdir()), [])  # nothing written
