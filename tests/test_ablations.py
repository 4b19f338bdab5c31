"""Shapes-world ablations (evaluation/shapes/ablations.py) and the paired bootstrap (evaluation/shapes/stats.py).

Fast tests check the paired-difference interval against closed forms, the group selection, and the whole
report (tables, verdicts, plots, curves) of groups run with the trainer and sampler replaced by fakes that
write what the real ones write (scorer rows; metrics through the trainer's own RunLog). The slow test runs
two groups end to end through the real CLIs on a micro teacher.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.shapes import ablations as A
from evaluation.shapes import benchmark as B
from evaluation.shapes import stats as S
from evaluation.summarize_geneval import TASKS

TAGS = [tag for tag, _ in TASKS]


def _scores(values_by_tag: dict[str, list[float]]) -> S.PromptScores:
    return {tag: {f"p{i:03d}": v for i, v in enumerate(values)} for tag, values in values_by_tag.items()}


# --------------------------------------------------------------------------------------------
# Paired bootstrap


def test_paired_difference_of_identical_scores_is_exactly_zero():
    rng = np.random.default_rng(0)
    a = _scores({tag: list(rng.random(9)) for tag in TAGS})
    result = S.paired_difference(a, a)
    assert result["delta"] == 0.0 and result["interval"] == [0.0, 0.0]
    assert result["verdict"] == "not separated"


def test_paired_difference_of_a_constant_shift_is_the_shift():
    rng = np.random.default_rng(1)
    base = {tag: list(rng.random(7) * 0.5) for tag in TAGS}
    shifted = {tag: [v + 0.25 for v in values] for tag, values in base.items()}
    result = S.paired_difference(_scores(shifted), _scores(base))
    assert result["delta"] == pytest.approx(0.25)
    assert result["interval"] == pytest.approx([0.25, 0.25])
    assert result["verdict"] == "better"
    assert S.paired_difference(_scores(base), _scores(shifted))["verdict"] == "worse"


def test_paired_interval_matches_the_normal_theory_of_the_differences():
    """Prompts share a difficulty (a large per-prompt effect both models see) and the variant adds
    μ + noise: the paired interval must cover μ at about the nominal rate and be as wide as
    2·1.96·σ_d/√n (the closed form for the mean of n independent differences), far narrower than the
    unpaired intervals of the two scores, which carry the difficulty's variance."""
    rng = np.random.default_rng(2)
    n, mu, sd, trials = 150, 0.03, 0.1, 200
    covered, widths = 0, []
    for k in range(trials):
        difficulty = rng.random(n)
        base = _scores({"colors": list(difficulty)})
        variant = _scores({"colors": list(difficulty + mu + sd * rng.standard_normal(n))})
        result = S.paired_difference(variant, base, n_boot=1000, seed=k)
        lo, hi = result["interval"]
        covered += lo <= mu <= hi
        widths.append(hi - lo)
    assert 0.90 <= covered / trials <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * sd / math.sqrt(n), rel=0.1)
    unpaired = S.bootstrap_interval({"colors": list(difficulty)})
    assert unpaired[1] - unpaired[0] > 2 * np.mean(widths)


def test_paired_difference_refuses_different_prompt_sets():
    a = _scores({"colors": [1.0, 0.0]})
    with pytest.raises(ValueError, match="different prompts"):
        S.paired_difference(a, {"colors": {"p000": 1.0, "other": 0.0}})
    with pytest.raises(ValueError, match="different tags"):
        S.paired_difference(a, _scores({"position": [1.0, 0.0]}))


def test_paired_ratio_of_a_scaled_model_is_the_scale_in_every_replicate():
    rng = np.random.default_rng(3)
    teacher = {tag: list(0.2 + 0.8 * rng.random(6)) for tag in TAGS}
    student = {tag: [0.75 * v for v in values] for tag, values in teacher.items()}
    result = S.paired_ratio(_scores(student), _scores(teacher))
    assert result["ratio"] == pytest.approx(0.75)
    assert result["interval"] == pytest.approx([0.75, 0.75])


def test_paired_ratio_interval_matches_the_delta_method():
    """Ratio R = mean(v)/mean(r) of paired prompt scores: to first order Var(R) = Var(v − R·r)/(n·mean(r)²)
    (the delta method), an independent closed form for the bootstrap's width; it also covers the true
    ratio at about the nominal rate."""
    rng = np.random.default_rng(4)
    n, trials, slope = 300, 150, 0.8

    def draw(size):
        r = rng.random(size)  # the teacher's prompt scores (difficulty, seen by both models)
        return np.clip(slope * r + 0.1 * rng.standard_normal(size), 0, None), r

    big_v, big_r = draw(2_000_000)
    population_ratio = big_v.mean() / big_r.mean()  # what the prompt bootstrap estimates
    covered, widths, theory = 0, [], []
    for k in range(trials):
        v, r = draw(n)
        result = S.paired_ratio(_scores({"counting": list(v)}), _scores({"counting": list(r)}), n_boot=1000, seed=k)
        lo, hi = result["interval"]
        R = v.mean() / r.mean()
        assert result["ratio"] == pytest.approx(R)
        covered += lo <= population_ratio <= hi
        widths.append(hi - lo)
        theory.append(2 * 1.96 * np.std(v - R * r) / (math.sqrt(n) * r.mean()))
    assert 0.88 <= covered / trials <= 0.99
    assert np.mean(widths) == pytest.approx(np.mean(theory), rel=0.1)


def test_paired_ratio_refuses_a_zero_reference_and_other_prompts():
    zero = _scores({"colors": [0.0, 0.0]})
    with pytest.raises(ValueError, match="undefined"):
        S.paired_ratio(_scores({"colors": [1.0, 0.5]}), zero)
    with pytest.raises(ValueError, match="different prompts"):
        S.paired_ratio(zero, {"colors": {"p000": 1.0, "other": 0.0}})


def test_prompt_scores_are_keyed_by_prompt_and_read_from_the_scorer_file(tmp_path):
    rows = [{"tag": "colors", "prompt": "a", "metadata": '{"p": "a"}', "correct": True},
            {"tag": "colors", "prompt": "a", "metadata": '{"p": "a"}', "correct": False},
            {"tag": "position", "prompt": "b", "metadata": '{"p": "b"}', "correct": True}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = S.read_prompt_scores(tmp_path)
    assert scores == {"colors": {json.dumps('{"p": "a"}'): 0.5}, "position": {json.dumps('{"p": "b"}'): 1.0}}
    assert S.per_prompt_scores(rows) == {"colors": [0.5], "position": [1.0]}
    with pytest.raises(FileNotFoundError, match="score the folder first"):
        S.read_prompt_scores(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# Groups


def test_parse_groups_all_subset_and_errors():
    assert A.parse_groups("all") == tuple(A.GROUPS)
    assert A.parse_groups("lora,kappa") == ("kappa", "lora")  # GROUPS order
    with pytest.raises(argparse.ArgumentTypeError, match="unknown ablation group.*nope"):
        A.parse_groups("kappa,nope")


def test_every_variant_changes_a_real_trainer_flag(tmp_path):
    """Each variant's command line, as the ablation builds it from the benchmark's baseline flags, parses
    with its method's own trainer parser, and every overridden flag ends up with another value than in
    the baseline's command (so no variant silently re-trains the baseline)."""
    import train_meanflow
    import train_sCM

    parsers = {"sCM": train_sCM.parse_args, "MeanFlow": train_meanflow.parse_args}
    stages = _fake_stages(tmp_path)
    stages.rescaled.parent.mkdir(parents=True)
    stages.rescaled.write_bytes(b"")  # the trainers' parsers check that it exists
    for group in A.GROUPS.values():
        for variant in group.variants:
            base = B.student_flags(stages, variant.method, tmp_path / "run")
            baseline = parsers[variant.method]([str(a) for a in B.render_flags(base)])
            changed = parsers[variant.method](
                [str(a) for a in B.render_flags(B.apply_overrides(base, variant.overrides))])
            for name in variant.overrides:
                dest = name[2:]
                assert getattr(changed, dest) != getattr(baseline, dest), (variant.key, name)


def test_every_variants_sampler_flags_parse_and_change_the_sampler():
    """A variant's extra sampling flags (e.g. the ``ema`` group's ``--use_ema``) are real options of its
    method's sampling CLI and change what it samples; without them the EMA students would be sampled raw."""
    from model.sampling_cli import parse_args

    names = {"sCM": "scm", "MeanFlow": "meanflow"}
    common = ["--prompt", "a red circle", "--resume_path", "run/ckpts/transformer_600.pt", "--output_dir", "out"]
    flagged = [v for g in A.GROUPS.values() for v in g.variants if v.sample_flags]
    assert {v.key for v in flagged} >= {"sCM_ema", "MeanFlow_ema"}
    for variant in flagged:
        plain = parse_args(names[variant.method], common)
        extra = parse_args(names[variant.method], common + list(variant.sample_flags))
        for flag in variant.sample_flags:
            dest = flag[2:]
            assert getattr(extra, dest) != getattr(plain, dest), (variant.key, flag)


def test_render_flags_switch_is_a_bare_flag():
    flags = {"--a": 1, "--b": True, "--use_ema": B.SWITCH, "--c": "x"}
    assert B.render_flags(flags) == ["--a", 1, "--b=True", "--use_ema", "--c", "x"]


# --------------------------------------------------------------------------------------------
# The report, with fake trainer and sampler


def _write_scored_folder(folder: Path, correct: dict[str, list[bool]]) -> None:
    from evaluation.geneval_layout import sample_path

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for tag, hits in correct.items():
        for i, hit in enumerate(hits):
            rows.append({"tag": tag, "prompt": f"{tag} {i}", "metadata": json.dumps({"tag": tag, "i": i}),
                         "correct": hit, "filename": str(sample_path(folder, i, 0))})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _summary(correct: dict[str, list[bool]]) -> dict:
    overall = float(np.mean([np.mean(h) for h in correct.values()]))
    scores = {tag: [float(h) for h in hits] for tag, hits in correct.items()}
    return {"overall": overall, "overall_interval": list(S.bootstrap_interval(scores)),
            "tasks": {tag: float(np.mean(h)) for tag, h in correct.items()}, "total_images": 12}


def _fake_stages(tmp_path: Path) -> B.Stages:
    config = replace(B.BenchmarkConfig(), student_nfes=(1, 2), teacher_nfes=(28,), scm_steps=30, meanflow_steps=30)
    runner = B.Runner(tmp_path, threads=1, echo=False)
    return B.Stages(runner, config, tmp_path, tmp_path / "teacher", {}, tmp_path / "heldout.jsonl", [],
                    tmp_path / "rescale" / "rescaled.pt")


#: Each model's correct-image pattern (2 prompts per tag): the variants differ from their baseline.
BASE = {tag: [False, False] for tag in TAGS}
BETTER = {tag: [True, True] for tag in TAGS}


def _write_metrics(run_dir: Path, norms: list[float], loss_key: str) -> None:
    from training.hooks import RunLog

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    log = RunLog(str(run_dir), enabled=True)
    for step, norm in enumerate(norms, 1):
        log.metric({"step": step, loss_key: 1.0 / step, "grad_norm": norm, "skipped_nonfinite": 0})


def test_groups_report_every_file_with_paired_deltas_and_verdicts(tmp_path, monkeypatch):
    stages = _fake_stages(tmp_path)
    trained = []

    def fake_train(stages_, method, stage, folder, overrides=None):
        trained.append((method, stage, overrides))
        if "--max_grad_norm" in (overrides or {}) and overrides["--max_grad_norm"] == 0.1:
            raise B.BenchmarkError("stage ablation_sCM_clip0.1 failed (exit 1): 20 consecutive non-finite steps")
        growth = 10.0 if (overrides or {}).get("--timestep_scale") == 1000 else 1.0
        _write_metrics(folder, [1.0 + (growth - 1.0) * k / 29 for k in range(30)], "loss_sCM")
        return folder / "ckpts" / "transformer_30.pt"

    def fake_sample(stages_, name, nfe, cli, folder):
        correct = BETTER if name == "sCM_x1000" and nfe == 2 else BASE
        _write_scored_folder(folder, correct)
        return {"model": name, "nfe": nfe, **_summary(correct), "samples_dir": str(folder)}

    monkeypatch.setattr(A, "train_student", fake_train)
    monkeypatch.setattr(A, "sample_and_score", fake_sample)
    # the main benchmark's rows: the teacher reference and the baselines (their runs wrote metrics too)
    _write_scored_folder(tmp_path / "t", BETTER)
    rows = [{"model": "teacher", "nfe": 28, **_summary(BETTER), "samples_dir": str(tmp_path / "t")}]
    for method in ("sCM", "MeanFlow"):
        _write_metrics(tmp_path / method, [1.0] * 30, "loss_sCM")
        for nfe in (1, 2):
            folder = tmp_path / "samples" / f"{method}_nfe{nfe}"
            _write_scored_folder(folder, BASE)
            rows.append({"model": method, "nfe": nfe, **_summary(BASE), "samples_dir": str(folder)})
    results = A.run_ablations(stages, ("timestep_scale", "max_grad_norm", "lora"), rows, chance=None)

    # baselines are reused: only the variants were trained, each in its own folder and stage
    assert [s for _, s, _ in trained] == ["ablation_sCM_x1000", "ablation_sCM_clip_off", "ablation_sCM_clip0.1",
                                          "ablation_sCM_lora16", "ablation_MeanFlow_lora16"]
    root = tmp_path / "ablations"
    for name in ("summary.md", "ablations.json", "timestep_scale/table.md", "timestep_scale/plot.png",
                 "timestep_scale/curves.png", "max_grad_norm/curves.png", "lora/table.md", "lora/plot.png"):
        assert (root / name).is_file(), name
    assert not (root / "lora" / "curves.png").exists()
    for name in ("timestep_scale/plot.png", "timestep_scale/curves.png"):
        with Image.open(root / name) as im:
            assert im.format == "PNG"
    saved = json.loads((root / "ablations.json").read_text())
    groups = {g["name"]: g for g in saved["groups"]}
    x1000 = groups["timestep_scale"]["arms"][0]["variants"][0]
    assert x1000["overrides"] == {"--rescaled_checkpoint_path": None, "--timestep_scale": "1000"}
    by_nfe = {r["nfe"]: r for r in x1000["rows"]}
    # NFE 2: every prompt flips to correct → +100 points on every prompt pair, a sure improvement
    assert by_nfe[2]["delta"]["delta"] == pytest.approx(1.0) and by_nfe[2]["delta"]["verdict"] == "better"
    assert by_nfe[1]["delta"] == {"delta": 0.0, "interval": [0.0, 0.0], "level": 0.95, "verdict": "not separated"}
    assert by_nfe[2]["relative_to_teacher"] == pytest.approx(1.0)
    assert by_nfe[2]["relative_interval"] == [1.0, 1.0] and by_nfe[1]["relative_interval"] == [0.0, 0.0]
    assert groups["timestep_scale"]["verdicts"] == [
        "sCM, ×1000 teacher, no rescaling (`--timestep_scale 1000`) vs from the rescaled ×1 teacher "
        "(`--rescaled_checkpoint_path`, `--timestep_scale 1`): not separated at NFE 1; variant better at NFE 2 "
        "(95 % paired bootstrap over prompts)"]
    # the curves are read back from the runs' metrics.jsonl: the ×1000 run's norm grows ×10
    curves = groups["timestep_scale"]["curves"]
    assert curves["sCM baseline"]["grad_norm_growth"] == pytest.approx(1.0)
    assert curves["sCM ×1000 teacher, no rescaling (`--timestep_scale 1000`)"]["grad_norm_growth"] == pytest.approx(
        np.mean([1 + 9 * k / 29 for k in range(27, 30)]) / np.mean([1 + 9 * k / 29 for k in range(3)]))
    # a failed variant is reported, the others still ran
    failed = groups["max_grad_norm"]["arms"][0]["variants"][1]
    assert failed["rows"] == [] and "non-finite" in failed["error"]
    assert "not measured: the variant's training failed" in groups["max_grad_norm"]["verdicts"][1]
    assert "| sCM | clip at 0.1 (`--max_grad_norm 0.1`, the release scripts' value) | — | training failed |" in \
        (root / "max_grad_norm" / "table.md").read_text()
    table = (root / "timestep_scale" / "table.md").read_text()
    assert "| sCM | ×1000 teacher, no rescaling (`--timestep_scale 1000`) | 2 | **100.0** [100.0, 100.0] | 100% [100, 100] | " \
           "+100.0 [+100.0, +100.0] | better |" in table
    summary = (root / "summary.md").read_text()
    assert summary.index("## Verdicts") < summary.index("## sCM from the ×1000 teacher")
    assert f"- `timestep_scale`: {groups['timestep_scale']['verdicts'][0]}" in summary
    assert [g["name"] for g in results["groups"]] == ["timestep_scale", "max_grad_norm", "lora"]
    assert [a["method"] for a in groups["lora"]["arms"]] == ["sCM", "MeanFlow"]


def test_a_variant_equal_to_the_baseline_is_skipped_not_trained(tmp_path, monkeypatch):
    stages = _fake_stages(tmp_path)
    stages.config = replace(stages.config, meanflow_cfg_kappa=0.0)  # the baseline already has κ = 0
    monkeypatch.setattr(A, "train_student", lambda *a, **k: pytest.fail("a no-op variant must not be trained"))
    group = A.run_group(stages, A.GROUPS["kappa"], [])
    variant = group["arms"][0]["variants"][0]
    assert variant["rows"] == [] and "its own baseline" in variant["skipped"]
    assert "not measured: the benchmark's MeanFlow student already uses" in group["verdicts"][0]
    assert "| MeanFlow | κ = 0 (`--cfg_kappa 0`: target ω·v_T, no student term) | — | skipped |" in \
        A.format_group_table(group)


# --------------------------------------------------------------------------------------------
# End to end through the real CLIs


@pytest.mark.slow
def test_ablations_end_to_end_on_a_micro_teacher(tmp_path):
    from evaluation.shapes import teacher as T

    teacher = tmp_path / "teacher"
    T.build_teacher(teacher, replace(T.TeacherConfig(), seed=0, num_images=24, vae_steps=2, vae_batch_size=4, steps=2,
                                     batch_size=4, warmup_steps=1, eval_prompts_per_tag=0), progress=False)
    config = replace(B.BenchmarkConfig(), num_images=16, heldout_prompts_per_tag=1, n_samples=1, sample_batch_size=6,
                     teacher_nfes=(1, 2), rescaled_nfes=(2,), student_nfes=(1,), rescale_steps=2,
                     rescale_batch_size=2, scm_steps=3, scm_batch_size=2, meanflow_steps=2, meanflow_batch_size=2,
                     grid_prompts=3)
    out = tmp_path / "bench"
    results = B.run_benchmark(out, config, teacher, echo=False, ablations=("timestep_scale", "lora"))
    root = out / "ablations"
    for name in ("summary.md", "ablations.json", "timestep_scale/table.md", "timestep_scale/plot.png",
                 "timestep_scale/curves.png", "lora/table.md", "lora/plot.png"):
        assert (root / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["ablations"] == json.loads((root / "ablations.json").read_text())
    assert "[ablations/summary.md](ablations/summary.md)" in (out / "table.md").read_text()
    stages = [c["stage"] for c in results["commands"]]
    assert stages.count("sCM") == 1 and stages.count("MeanFlow") == 1  # the baselines, trained once
    assert {"ablation_sCM_x1000", "ablation_sCM_lora16", "ablation_MeanFlow_lora16"} <= set(stages)
    groups = {g["name"]: g for g in results["ablations"]["groups"]}
    # the ×1000 student was trained from the stock teacher (no rescaled checkpoint) and sampled at ×1000
    x1000 = groups["timestep_scale"]["arms"][0]["variants"][0]
    run_config = json.loads(next(Path(x1000["run_dir"], "checkpoints").glob("*/run_config.json")).read_text())
    assert run_config["timestep_scale"] == 1000.0 and run_config["rescaled_checkpoint_path"] is None
    assert x1000["rows"][0]["total_images"] == 6 and x1000["rows"][0]["delta"]["level"] == 0.95
    # gradient-norm curves from the runs' own metrics.jsonl, one point per optimizer step
    for label, curve in groups["timestep_scale"]["curves"].items():
        assert curve["steps"] == 3 and curve["loss_key"] == "loss_sCM" and curve["grad_norm_max"] > 0, label
    lora = groups["lora"]["arms"][1]["variants"][0]
    assert (Path(lora["run_dir"]) / "ckpts" / "lora_2").is_dir() and lora["rows"][0]["nfe"] == 1
    # re-running reuses every stage, the ablations included
    again = B.run_benchmark(out, config, teacher, echo=False, ablations=("timestep_scale", "lora"))
    assert all(c["reused"] for c in again["commands"])
