"""The shapes scorer's chance floor (evaluation/shapes/chance.py): measured on untrained-model and noise samples,
printed as a row of every benchmark table and a line of every plot, results at or below it flagged."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from evaluation.shapes import benchmark as B
from evaluation.shapes import teacher as T
from evaluation.shapes.chance import below_chance, chance_row, measure_chance
from evaluation.shapes.domain import make_heldout_metadata
from evaluation.summarize_geneval import TASKS

from conftest import REPO_ROOT

TAGS = [tag for tag, _ in TASKS]


def _chance(overall: float) -> dict:
    tasks = {tag: overall for tag in TAGS}
    return {"floor": {"overall": overall, "tasks": tasks}, "untrained_model": {"overall": overall, "tasks": tasks},
            "noise": {"overall": 0.0, "tasks": {t: 0.0 for t in TAGS}}, "settings": {"nfe": 28}}


def _row(model: str, nfe: int, overall: float) -> dict:
    return {"model": model, "nfe": nfe, "overall": overall, "tasks": {tag: overall for tag in TAGS}}


def test_table_has_a_chance_row_and_flags_results_at_or_below_it():
    rows = [_row("teacher", 28, 0.34), _row("teacher", 4, 0.156), _row("sCM", 1, 0.167)]
    lines = B.format_table(rows, 28, _chance(0.167)).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[0] for c in cells] == ["Teacher (Euler)", "Teacher (Euler)", "sCM", "Chance (untrained model)"]
    assert cells[0][8] == "**34.0**"
    assert cells[1][8] == "**15.6** (≤ chance)" and cells[2][8] == "**16.7** (≤ chance)"  # a tie shows nothing either
    assert cells[3][2:9] == ["16.7"] * 6 + ["**16.7**"]
    assert len(B.format_table(rows, 28).splitlines()) == 2 + len(rows)  # no chance measured: no row


def test_plot_draws_the_floor(tmp_path):
    size = (720, 460)
    path = B.draw_plot([_row("teacher", 1, 0.1), _row("teacher", 28, 0.9)], tmp_path / "plot.png", size,
                       chance=_chance(0.5))
    pixels = np.asarray(Image.open(path).convert("RGB"))
    _, y = B.plot_transform([1, 28], size)(1, 0.5)
    left, _, _, _ = B._PLOT_MARGINS
    row = pixels[round(y), left + 1:left + 30]
    assert (row == (120, 120, 120)).all(axis=1).sum() >= 6  # a dash of the grey line on the floor's height


def test_below_chance():
    chance = _chance(0.2)
    assert below_chance(_row("sCM", 1, 0.2), chance) and not below_chance(_row("sCM", 1, 0.21), chance)
    assert not below_chance(chance_row(chance), chance) and not below_chance(_row("sCM", 1, 0.0), None)


@pytest.mark.slow
def test_measure_chance_on_a_micro_teacher(tmp_path):
    """Noise finds no shape at all (score 0 on every task); the floor is the per-task maximum of the two."""
    teacher = tmp_path / "teacher"
    T.build_teacher(teacher, replace(T.TeacherConfig(), num_images=24, vae_steps=2, vae_batch_size=4, steps=2,
                                     batch_size=4, warmup_steps=1, eval_prompts_per_tag=0), progress=False)
    meta = make_heldout_metadata(tmp_path / "heldout.jsonl", 1, 0)
    chance = measure_chance(tmp_path / "chance", teacher, tmp_path / "heldout.jsonl", n_samples=2, sample_seed=42,
                            resolution=64, guidance_scale=4.5, nfe=2, max_sequence_length=16)
    assert chance["settings"]["images"] == 2 * len(meta)
    assert chance["noise"]["overall"] == 0.0 and set(chance["noise"]["tasks"].values()) == {0.0}
    assert chance["untrained_model"]["total_images"] == chance["noise"]["total_images"] == 2 * len(meta)
    for tag in TAGS:
        assert chance["floor"]["tasks"][tag] == max(chance["untrained_model"]["tasks"][tag], 0.0)
    assert chance["floor"]["overall"] == chance["untrained_model"]["overall"]


def test_committed_figure_matches_the_benchmark_settings():
    """docs/toy_benchmark/chance.json was measured with the full benchmark's prompts, seeds and image count."""
    chance = json.loads((REPO_ROOT / "docs" / "toy_benchmark" / "chance.json").read_text())
    d = B.BenchmarkConfig()
    s = chance["settings"]
    assert (s["heldout_prompts_per_tag"], s["seed"], s["sample_seed"], s["n_samples"], s["resolution"],
            s["guidance_scale"], s["nfe"]) == (d.heldout_prompts_per_tag, d.seed, d.sample_seed, d.n_samples,
                                               d.resolution, d.guidance_scale, d.reference_nfe)
    assert s["images"] == 6 * d.heldout_prompts_per_tag * d.n_samples
    assert chance["floor"]["overall"] == max(chance["untrained_model"]["overall"], chance["noise"]["overall"])
