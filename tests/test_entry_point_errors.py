"""Missing or malformed input to the light entry points (GenEval summariser, shapes scorer): one line on
stderr that says what is wrong, exit status 2, no traceback, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from evaluation.shapes import scorer
from evaluation.summarize_geneval import main as summarize_main

GOOD_ROW = {"tag": "colors", "correct": True, "metadata": json.dumps({"prompt": "a red circle", "tag": "colors"})}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[0]


@pytest.mark.parametrize("content,extra,first_line", [
    (None, [], "error: results file not found: {results} (GenEval's evaluate_images.py or"),
    ('{"tag": "colors", "correct": true\n', [], "error: {results}:1: not valid JSON (Expecting ',' delimiter)"),
    ("[1, 2]\n", [], "error: {results}:1: expected a JSON object per line, got list"),
    ('{"correct": true, "prompt": "x"}\n', [], "error: {results}:1: result row has no 'tag'"),
    (json.dumps({**GOOD_ROW, "correct": "maybe"}) + "\n", [], "error: results line 1: 'correct' must be a boolean"),
    ("", [], "error: no result rows to summarise"),
    (json.dumps(GOOD_ROW) + "\n", ["--metadata", "{missing}"], "error: --metadata file not found: {missing}"),
    (json.dumps(GOOD_ROW) + "\n", ["--metadata", "{results}"], "error: {results}:1: "),
], ids=["missing", "truncated_json", "not_an_object", "no_tag", "bad_correct", "empty", "missing_metadata",
        "results_as_metadata"])
def test_summarizer_bad_inputs(tmp_path, capsys, content, extra, first_line):
    results, missing = tmp_path / "results.jsonl", tmp_path / "nope.jsonl"
    if content is not None:
        results.write_text(content)
    extra = [x.format(results=results, missing=missing) for x in extra]
    json_out = tmp_path / "summary.json"
    code = summarize_main([str(results), *extra, "--json", str(json_out)])
    assert code == 2
    assert _error_line(capsys).startswith(first_line.format(results=results, missing=missing))
    assert not json_out.exists()


def test_summarizer_as_a_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evaluation.summarize_geneval", str(tmp_path / "missing.jsonl")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: results file not found: {tmp_path / 'missing.jsonl'}")


def test_scorer_missing_folder(tmp_path, capsys):
    from training.cli import run_cli

    out = tmp_path / "results.jsonl"
    code = run_cli(lambda: scorer.main([str(tmp_path / "no_images"), "--outfile", str(out)]))
    assert code == 2
    assert _error_line(capsys).startswith(f"error: image_dir {tmp_path / 'no_images'} is not a folder")
    assert not out.exists()
