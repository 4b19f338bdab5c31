"""GenEval data files, folder-layout helpers and the results summariser."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from evaluation.geneval_layout import (
    MetadataError,
    check_folder,
    prompt_dir,
    read_metadata,
    sample_path,
    write_prompt_metadata,
)
from evaluation.summarize_geneval import format_table, main as summarize_main, summarize

EVAL_DIR = Path(__file__).resolve().parents[1] / "evaluation"


def test_geneval_files_have_553_valid_lines():
    metadata_file = EVAL_DIR / "evaluation_metadata.jsonl"
    raw = metadata_file.read_text(encoding="utf-8").splitlines()
    assert len(raw) == 553
    rows = read_metadata(metadata_file)
    assert len(rows) == 553
    for row in rows:
        assert row["prompt"].strip() and row["tag"].strip()
        assert row["include"], row
    assert Counter(r["tag"] for r in rows) == {
        "single_object": 80, "two_object": 99, "counting": 80,
        "colors": 94, "position": 100, "color_attr": 100,
    }
    prompts = (EVAL_DIR / "generation_prompts.txt").read_text(encoding="utf-8").splitlines()
    assert prompts == [r["prompt"] for r in rows]


def _row(tag, prompt, correct, index=0):
    meta = {"tag": tag, "include": [{"class": "x", "count": 1}], "prompt": prompt}
    return {"filename": f"{prompt}/{index:04d}.png", "tag": tag, "prompt": prompt, "correct": correct,
            "reason": "", "metadata": json.dumps(meta), "details": "{}"}


def _hand_made_results(path: Path) -> list[dict]:
    rows = []
    rows += [_row("single_object", "a", c, i) for i, c in enumerate([True, True, True, False])]   # 3/4
    rows += [_row("two_object", "b", c, i) for i, c in enumerate([True, False])]                 # 1/2
    rows += [_row("counting", "c", False, i) for i in range(2)]                                  # 0/2
    rows += [_row("colors", "d", True)]                                                          # 1/1
    rows += [_row("position", "e1", c, i) for i, c in enumerate([False, True])]                  # 1/4 over
    rows += [_row("position", "e2", False, i) for i in range(2)]                                 # two prompts
    rows += [_row("color_attr", "f", True, i) for i in range(2)]                                 # 2/2
    with open(path, "w") as fh:
        for r in rows:
            # GenEval writes through pandas: booleans as true/false
            fh.write(json.dumps(r) + "\n")
    return rows


def test_summarize_hand_computed(tmp_path):
    results = tmp_path / "results.jsonl"
    _hand_made_results(results)
    s = summarize(results)
    assert s["total_images"] == 15
    assert s["total_prompts"] == 7
    assert s["correct_images"] == pytest.approx(8 / 15)
    assert s["correct_prompts"] == pytest.approx(5 / 7)  # a, b, d, e1, f
    acc = {tag: t["accuracy"] for tag, t in s["tasks"].items()}
    assert acc == pytest.approx({"single_object": 0.75, "two_object": 0.5, "counting": 0.0,
                                 "colors": 1.0, "position": 0.25, "color_attr": 1.0})
    assert s["tasks"]["position"]["correct"] == 1 and s["tasks"]["position"]["total"] == 4
    assert s["overall"] == pytest.approx(3.5 / 6)
    assert s["missing_tasks"] == [] and s["unknown_tasks"] == []
    table = format_table(s)
    assert table.splitlines()[0] == ("| Single obj. | Two obj. | Counting | Colors | Position | Color attr. | Overall |")
    assert table.splitlines()[2] == "| 75.00 | 50.00 | 0.00 | 100.00 | 25.00 | 100.00 | 58.33 |"


def test_summarize_warns_on_missing_prompts_and_cli(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    rows = _hand_made_results(results)
    metadata = [json.loads(m) for m in dict.fromkeys(r["metadata"] for r in rows)]
    extra = {"tag": "colors", "include": [{"class": "x", "count": 1}], "prompt": "missing one"}
    meta_file = tmp_path / "meta.jsonl"
    meta_file.write_text("".join(json.dumps(m) + "\n" for m in metadata + [extra]))
    with pytest.warns(UserWarning, match="only 7 distinct prompts .* has 8"):
        s = summarize(results, meta_file)
    assert s["expected_prompts"] == 8 and s["missing_prompts"] == ["missing one"]

    out = tmp_path / "summary.json"
    with pytest.warns(UserWarning):
        assert summarize_main([str(results), "--metadata", str(meta_file), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 75.00 | 50.00 | 0.00 | 100.00 | 25.00 | 100.00 | 58.33 |" in printed
    assert "Overall score (avg. over tasks): 0.58333" in printed
    assert json.loads(out.read_text())["overall"] == pytest.approx(3.5 / 6)


def test_summarize_missing_task_warns(tmp_path):
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(_row("colors", "d", True)) + "\n")
    with pytest.warns(UserWarning, match="tasks without any result"):
        s = summarize(results)
    assert s["overall"] == 1.0 and "counting" in s["missing_tasks"]
    assert "| — | — | — | 100.00 | — | — | 100.00 |" in format_table(s)


def test_read_metadata_reports_line_number(tmp_path):
    path = tmp_path / "meta.jsonl"
    good = {"tag": "colors", "include": [], "prompt": "a photo of a red car"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"tag": "colors", "include": []}) + "\n")
    with pytest.raises(MetadataError, match=r"meta\.jsonl:2: missing or empty 'prompt'"):
        read_metadata(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    with pytest.raises(MetadataError, match=r":3: not valid JSON"):
        read_metadata(path)
    path.write_text(json.dumps(good) + "\n[1, 2]\n")
    with pytest.raises(MetadataError, match=r":2: expected a JSON object"):
        read_metadata(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    with pytest.raises(MetadataError, match=r":2: empty line"):
        read_metadata(path)
    path.write_text(json.dumps({"prompt": "p", "tag": ""}) + "\n")
    with pytest.raises(MetadataError, match=r":1: missing or empty 'tag'"):
        read_metadata(path)
    path.write_text(json.dumps(good) + "\n\n")  # trailing blank lines are fine
    assert read_metadata(path) == [good]


def test_layout_paths():
    assert prompt_dir("/x", 7) == Path("/x/00007")
    assert sample_path("/x", 552, 3) == Path("/x/00552/samples/0003.png")


def test_check_folder_reports_missing(tmp_path):
    metadata = [{"tag": "colors", "include": [], "prompt": f"prompt {i}"} for i in range(4)]
    root = tmp_path / "images"
    for i, meta in enumerate(metadata):
        write_prompt_metadata(root, i, meta)
        for k in range(2):
            sample_path(root, i, k).write_bytes(b"png")
    (prompt_dir(root, 0) / "samples" / "grid.png").write_bytes(b"ignored")
    assert check_folder(root, metadata, n_samples=2) == []

    sample_path(root, 1, 1).unlink()
    for f in (prompt_dir(root, 2) / "samples").iterdir():
        f.unlink()
    (prompt_dir(root, 2) / "samples").rmdir()
    (prompt_dir(root, 2) / "metadata.jsonl").unlink()
    write_prompt_metadata(root, 3, metadata[0])
    write_prompt_metadata(root, 9, metadata[0])
    problems = check_folder(root, metadata, n_samples=2)
    assert len(problems) == 5, problems
    assert problems[0] == "00001/samples: 1 of 2 samples (missing 0001.png)"
    assert problems[1] == "00002/metadata.jsonl: missing"
    assert problems[2].startswith("00002/samples: missing")
    assert problems[3].startswith("00003/metadata.jsonl: differs from metadata line 4")
    assert problems[4].startswith("00009: folder beyond")

    import shutil

    shutil.rmtree(prompt_dir(root, 0))
    assert check_folder(root, metadata, n_samples=2)[0] == "00000: prompt folder missing ('prompt 0')"
    assert check_folder(tmp_path / "nope", metadata) == [f"{tmp_path / 'nope'}: image folder does not exist"]
