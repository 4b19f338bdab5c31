"""The schedule sweep (evaluation/shapes/sweep.py): the choice rule, the benchmark command it prints, and
(slow) a micro sweep through the real trainer and sampler CLIs that scores on the validation prompts only."""
from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from evaluation.geneval_layout import read_metadata
from evaluation.shapes import benchmark as B
from evaluation.shapes import sweep as S


def _row(steps: int, overall: float, lr: float = 1e-4) -> dict:
    return {"key": S.Candidate(steps, lr).key, "steps": steps, "learning_rate": lr, "warmup": 0, "overall": overall}


def test_choose_takes_the_best_score_and_breaks_ties_toward_fewer_steps():
    rows = [_row(1200, 0.50), _row(300, 0.55), _row(600, 0.55), _row(300, 0.40, 2e-4)]
    assert S.choose(rows)["key"] == S.Candidate(300, 1e-4).key
    rows = [_row(1200, 0.60), _row(600, 0.60, 2e-4), _row(600, 0.60)]
    assert S.choose(rows) is rows[1]  # same score and steps: the earlier (grid order: lower LR first)
    with pytest.raises(ValueError):
        S.choose([])


def test_grid_is_every_combination_cheapest_first():
    cands = S.grid((600, 300), (2e-4, 1e-4), (0, 50, 0))
    assert len(cands) == 8 and len({c.key for c in cands}) == 8
    assert [c.steps for c in cands] == [300] * 4 + [600] * 4
    assert cands[0] == S.Candidate(300, 1e-4, 0)


@pytest.mark.parametrize("method", ["sCM", "MeanFlow"])
def test_printed_benchmark_command_runs_the_chosen_schedule_on_the_report_set(method, tmp_path):
    """Parsed by the benchmark's own parser, the printed command gives the sweep's base config with the chosen
    schedule, on the report prompts."""
    argv = ["--output_dir", str(tmp_path / "sweep"), "--quick", "--method", method, "--steps", "10,20",
            f"--learning_rate=1e-4,3e-4", "--warmup", "0,5", "--num_images", "200", "--fresh",
            f"--{S.PREFIX[method]}_steps", "99", "--target_nfe", "1", "--validation_prompts_per_tag", "3"]
    args = S.build_parser().parse_args(argv)
    base = B.config_from_args(args)
    chosen = S.Candidate(20, 3e-4, 5)
    command = shlex.split(S.benchmark_command(argv, method, chosen, tmp_path / "report"))
    assert command[:3] == ["python", "-m", "evaluation.shapes.benchmark"]
    bench_args = B.build_parser().parse_args(command[3:])
    assert bench_args.output_dir == str(tmp_path / "report") and not bench_args.fresh
    reported = B.config_from_args(bench_args)
    assert reported == chosen.config(base, method)
    assert reported.prompt_set == "report" and reported.num_images == 200
    prefix = S.PREFIX[method]
    assert (getattr(reported, f"{prefix}_steps"), getattr(reported, f"{prefix}_lr_warmup_steps")) == (20, 5)


def test_lr_warm_up_reaches_the_trainer_only_when_set(tmp_path):
    stages = B.Stages(runner=None, config=B.BenchmarkConfig(), out=tmp_path, teacher_dir=tmp_path, info={},
                      heldout=tmp_path / "h.jsonl", metadata=[], rescaled=tmp_path / "r.pt")
    plain = B.student_flags(stages, "sCM", tmp_path / "s")
    assert "--lr_scheduler" not in plain and "--lr_warmup_steps" not in plain  # the release's constant LR
    warm = B.student_flags(replace(stages, config=S.Candidate(40, 1e-4, 7).config(stages.config, "MeanFlow")),
                           "MeanFlow", tmp_path / "m")
    assert warm["--lr_scheduler"] == "constant_with_warmup" and warm["--lr_warmup_steps"] == 7
    assert warm["--max_train_steps"] == 40 and warm["--learning_rate"] == 1e-4


@pytest.mark.slow
def test_micro_sweep_scores_validation_prompts_only_and_picks_the_argmax(tmp_path):
    from test_toy_benchmark import _micro_teacher_config

    from evaluation.shapes import teacher as T
    from evaluation.shapes.scorer import score_folder
    from evaluation.summarize_geneval import summarize_rows

    teacher = tmp_path / "teacher"
    T.build_teacher(teacher, _micro_teacher_config(), progress=False)
    base = replace(B.BenchmarkConfig(), num_images=16, heldout_prompts_per_tag=1, validation_prompts_per_tag=1,
                   n_samples=1, sample_batch_size=6, rescale_steps=2, rescale_batch_size=2, scm_batch_size=2)
    out = tmp_path / "sweep"
    candidates = [S.Candidate(2, 1e-4), S.Candidate(3, 2e-4)]
    sweep = S.run_sweep(out, base, "sCM", candidates, target_nfe=1, teacher_dir=teacher, echo=False)
    sweep["benchmark_command"] = "python -m evaluation.shapes.benchmark ..."
    S.write_sweep(out, sweep)
    assert (out / "sweep.json").is_file() and (out / "sweep.md").is_file()
    written = json.loads((out / "sweep.json").read_text())
    assert [c["key"] for c in written["candidates"]] == [c.key for c in candidates]
    # the choice is the argmax of the written scores (ties: fewer steps), and each score is its folder's
    best = max(written["candidates"], key=lambda r: (r["overall"], -r["steps"]))
    assert written["chosen"] == best["key"]
    assert f"| {best['steps']} | {best['learning_rate']:g} |" in (out / "sweep.md").read_text()
    validation = read_metadata(out / "data" / "validation_metadata.jsonl")
    report = {s["prompt"] for s in read_metadata(out / "data" / "heldout_metadata.jsonl")}
    for row in written["candidates"]:
        assert len(row["overall_interval"]) == 2 and row["overall_interval"][0] <= row["overall"] <= row["overall_interval"][1]
        assert summarize_rows(score_folder(Path(row["samples_dir"])), validation)["overall"] == row["overall"]
    # nothing was sampled on the report set: every sample folder holds validation prompts only
    folders = sorted((out / "samples").iterdir())
    assert len(folders) == len(candidates)
    for folder in folders:
        prompts = [json.loads((d / "metadata.jsonl").read_text())["prompt"] for d in sorted(folder.iterdir())
                   if d.is_dir()]
        assert prompts == [s["prompt"] for s in validation] and not set(prompts) & report
    sampled = [c["command"] for c in written["commands"] if c["stage"].startswith("sample_")]
    assert sampled and all("validation_metadata.jsonl" in c and "heldout_metadata.jsonl" not in c for c in sampled)
    # re-running skips every finished stage and gives the same scores
    again = S.run_sweep(out, base, "sCM", candidates, target_nfe=1, teacher_dir=teacher, echo=False)
    assert all(c["reused"] for c in again["commands"])
    assert [r["overall"] for r in again["candidates"]] == [r["overall"] for r in written["candidates"]]


def test_sweeps_of_both_methods_in_one_folder_use_their_own_runs_and_samples(tmp_path, monkeypatch):
    """A candidate's run and sample folders carry the method: an sCM and a MeanFlow sweep sharing one OUT (its
    data and rescaled teacher) must not train or sample into each other's folders (a trainer resumes whatever
    checkpoint its output folder holds)."""
    used = []
    monkeypatch.setattr(B, "train_student", lambda stages, method, stage, folder: used.append(folder) or folder / "x.pt")
    monkeypatch.setattr(B, "sample_and_score", lambda stages, name, nfe, cli, folder: used.append(folder) or
                        {"overall": 0.5, "overall_interval": [0.4, 0.6], "tasks": {}})
    stages = B.Stages(B.Runner(tmp_path, threads=1, echo=False), B.BenchmarkConfig(), tmp_path, tmp_path / "teacher",
                      {}, tmp_path / "validation.jsonl", [], tmp_path / "rescaled.pt")
    candidate = S.Candidate(600, 1e-4)
    S._run_candidate(stages, "sCM", candidate, 2)
    S._run_candidate(stages, "MeanFlow", candidate, 2)
    assert len(set(used)) == 4
    assert used[0].parent == used[2].parent == tmp_path / "runs" and used[0].name.startswith("sCM_")
