"""Shapes teacher build and the end-to-end distillation benchmark (evaluation/shapes/{teacher,benchmark}.py).

Fast tests check the report writers against hand-made results, the stage runner's skip logic and the
teacher build's determinism and latent normalisation; the slow test runs the whole benchmark (every
real CLI) on a teacher trained for a handful of steps.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.shapes import benchmark as B
from evaluation.shapes import teacher as T
from evaluation.summarize_geneval import TASKS

TAGS = [tag for tag, _ in TASKS]


def _row(model: str, nfe: int, overall: float, folder: Path | None = None) -> dict:
    # task accuracies whose unweighted mean is `overall` (alternating ±0.05 around it)
    tasks = {tag: overall + (0.05 if k % 2 else -0.05) for k, tag in enumerate(TAGS)}
    return {"model": model, "nfe": nfe, "overall": overall, "tasks": tasks, "samples_dir": str(folder or "/nonexistent")}


def _micro_teacher_config(seed: int = 0) -> T.TeacherConfig:
    return replace(T.TeacherConfig(), seed=seed, num_images=24, vae_steps=2, vae_batch_size=4, steps=2, batch_size=4,
                   warmup_steps=1, eval_prompts_per_tag=0)


# --------------------------------------------------------------------------------------------
# Targets and table


def test_targets_against_hand_computed_ratios():
    rows = [_row("teacher", 1, 0.10), _row("teacher", 2, 0.30), _row("teacher", 28, 0.80),
            _row("sCM", 1, 0.70), _row("sCM", 2, 0.78), _row("MeanFlow", 4, 0.70), _row("MeanFlow", 1, 0.15),
            _row("MeanFlow", 2, 0.66)]
    targets = {(t["model"], t["nfe"], t["kind"]): t for t in B.evaluate_targets(rows, 28, margin=0.10)}
    assert targets[("sCM", 2, "relative")]["value"] == pytest.approx(0.975)  # 0.78 / 0.80 >= 0.95
    assert targets[("sCM", 2, "relative")]["met"] is True
    assert targets[("sCM", 1, "relative")]["value"] == pytest.approx(0.875)  # 0.70 / 0.80 >= 0.85
    assert targets[("sCM", 1, "relative")]["met"] is True
    assert targets[("MeanFlow", 4, "relative")]["value"] == pytest.approx(0.875)  # < 0.95
    assert targets[("MeanFlow", 4, "relative")]["met"] is False
    assert targets[("MeanFlow", 2, "relative")]["value"] == pytest.approx(0.825)  # 0.66 / 0.80 >= 0.80
    assert targets[("MeanFlow", 2, "relative")]["met"] is True
    assert targets[("sCM", 1, "margin")]["value"] == pytest.approx(0.60)  # 0.70 − teacher@1 0.10
    assert targets[("MeanFlow", 1, "margin")]["value"] == pytest.approx(0.05)
    assert targets[("MeanFlow", 1, "margin")]["met"] is False  # beats the teacher, but not by 10 points
    assert targets[("MeanFlow", 4, "margin")]["met"] is None  # no teacher@4 row: not measured


def test_table_rows_columns_and_relative_scores():
    rows = [_row("teacher", 28, 0.80), _row("sCM", 2, 0.60)]
    table = B.format_table(rows, 28).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[2:8] == [title for _, title in TASKS]  # the paper's column order
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells[0] == "sCM" and cells[1] == "2"
    assert [float(c) for c in cells[2:8]] == pytest.approx([100 * rows[1]["tasks"][t] for t in TAGS], abs=0.05)
    assert cells[8] == "**60.0**"
    assert cells[9] == "75%"  # 60 / 80
    assert len(table) == 2 + len(rows)


def test_table_prints_the_overall_interval():
    rows = [_row("teacher", 28, 0.80), dict(_row("sCM", 2, 0.60), overall_interval=[0.512, 0.687])]
    table = B.format_table(rows, 28).splitlines()
    assert "95% CI" in table[0]
    assert [c.strip() for c in table[3].strip("|").split("|")][8] == "**60.0** [51.2, 68.7]"
    assert [c.strip() for c in table[2].strip("|").split("|")][8] == "**80.0**"  # no interval recorded


def test_bootstrap_interval_covers_a_known_proportion_at_the_binomial_rate():
    """200 Bernoulli(0.3) prompts: the 95 % interval must cover 0.3 in about 95 % of data sets and be as
    wide as the normal approximation 2·1.96·sqrt(p(1 − p)/n) (an independent closed form)."""
    rng = np.random.default_rng(0)
    p, n, trials = 0.3, 200, 300
    covered, widths = 0, []
    for k in range(trials):
        scores = rng.random(n) < p
        lo, hi = B.bootstrap_interval({"counting": scores.astype(float)}, n_boot=1000, seed=k)
        covered += lo <= p <= hi
        widths.append(hi - lo)
    assert 0.91 <= covered / trials <= 0.985
    assert np.mean(widths) == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / n), rel=0.08)


def test_bootstrap_interval_is_stratified_over_tags():
    # within each tag every prompt scores the same, so resampling prompts cannot move the overall score
    # (an unstratified resample of the pooled prompts would)
    lo, hi = B.bootstrap_interval({"colors": [1.0] * 5, "position": [0.0] * 7})
    assert lo == hi == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least one prompt"):
        B.bootstrap_interval({"colors": []})


def test_per_prompt_scores_average_the_images_of_each_prompt():
    rows = [{"tag": "colors", "prompt": "a", "correct": True}, {"tag": "colors", "prompt": "a", "correct": False},
            {"tag": "colors", "prompt": "b", "correct": True}, {"tag": "position", "prompt": "c", "correct": False}]
    assert B.per_prompt_scores(rows) == {"colors": [0.5, 1.0], "position": [0.0]}


def test_notice_filter_shows_each_notice_once_and_keeps_progress_bars():
    console = B.NoticeFilter()
    notice = b"[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back\n"
    first = console.filter(notice + b"step 1\n" + b"\rsampling:  50%")
    assert first == notice + b"step 1\n" + b"\rsampling:  50%"
    assert console.filter(b"\rsampling: 100%\n" + notice[:20]) == b"\rsampling: 100%\n"  # partial line waits
    assert console.filter(notice[20:] + b"step 2\n") == b"step 2\n"  # the repeated notice is dropped
    stamped = b"[2026-12-04 02:14:04,200] [WARNING] [real_accelerator.py:213] Setting accelerator to CPU.\n"
    assert console.filter(stamped) == stamped
    assert console.filter(stamped.replace(b"02:14:04,200", b"02:15:09,001")) == b""  # same notice, new time
    assert console.filter(b"done") == b"" and console.flush() == b"done"


def test_grid_columns_round_robin_over_tags():
    metadata = [{"tag": tag, "prompt": f"{tag} {k}"} for tag in TAGS for k in range(3)]
    cols = B.grid_columns(metadata, 8)
    assert cols == [0, 3, 6, 9, 12, 15, 1, 4]  # first prompt of each tag, then second ones
    assert B.grid_columns(metadata[:2], 8) == [0, 1]  # never more than exists


# --------------------------------------------------------------------------------------------
# Grid and plot images


def _fake_samples(root: Path, colours: list[tuple[int, int, int]], n_prompts: int) -> list[dict]:
    from evaluation.geneval_layout import sample_path, write_prompt_metadata

    metadata = [{"tag": TAGS[i % len(TAGS)], "prompt": f"a photo of prompt {i}"} for i in range(n_prompts)]
    for i, spec in enumerate(metadata):
        write_prompt_metadata(root, i, spec)
        Image.new("RGB", (64, 64), colours[i]).save(sample_path(root, i, 0))
    return metadata


def test_grid_places_sample_zero_of_each_prompt_in_its_row_and_column(tmp_path):
    colours_a = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    colours_b = [(255, 255, 0), (0, 255, 255), (255, 0, 255)]
    meta = _fake_samples(tmp_path / "a", colours_a, 3)
    _fake_samples(tmp_path / "b", colours_b, 3)
    rows = [_row("teacher", 28, 0.5, tmp_path / "a"), _row("sCM", 1, 0.4, tmp_path / "b")]
    columns = [2, 0]
    path = B.draw_grid(rows, meta, columns, tmp_path / "grid.png", cell=40)
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    # recover the layout from the image itself: the pixel rows/columns that hold the sample colours
    for r, colours in enumerate((colours_a, colours_b)):
        for c, index in enumerate(columns):
            hits = np.argwhere(np.all(grid == colours[index], axis=-1))
            assert len(hits) == 40 * 40, f"row {r} col {c}: expected one 40x40 cell"
            (y0, x0), (y1, x1) = hits.min(0), hits.max(0)
            assert (y1 - y0, x1 - x0) == (39, 39)
            if c > 0:  # columns left to right in the requested order, same x in both rows
                prev = np.argwhere(np.all(grid == colours[columns[c - 1]], axis=-1)).min(0)
                assert x0 > prev[1] and y0 == prev[0]
        if r > 0:
            assert np.argwhere(np.all(grid == colours_b[2], axis=-1)).min(0)[0] > np.argwhere(
                np.all(grid == colours_a[2], axis=-1)).min(0)[0]
    # the prompt that was not chosen is not drawn
    assert not np.all(grid == colours_a[1], axis=-1).any()


def test_plot_marks_each_score_at_its_nfe(tmp_path):
    rows = [_row("teacher", 1, 0.1), _row("teacher", 28, 0.9), _row("sCM", 2, 0.5), _row("MeanFlow", 4, 0.75)]
    size = (720, 460)
    path = B.draw_plot(rows, tmp_path / "plot.png", size)
    with Image.open(path) as im:
        assert im.size == size
        pixels = np.asarray(im.convert("RGB"))
    xy = B.plot_transform([1, 2, 4, 28], size)
    for row in rows:
        x, y = xy(row["nfe"], row["overall"])
        assert tuple(pixels[round(y), round(x)]) == B._COLORS[row["model"]], row
    # log2 axis: NFE 2 lies a fifth of the way from 1 to 28? no — log2(2)/log2(28) of it
    x1, _ = xy(1, 0)
    x28, _ = xy(28, 0)
    x2, _ = xy(2, 0)
    assert (x2 - x1) / (x28 - x1) == pytest.approx(1 / math.log2(28))


def _scored(folder: Path) -> Path:
    from evaluation.shapes.scorer import score_folder

    score_folder(folder, folder / "results.jsonl")
    return folder


def test_write_report_writes_every_file(tmp_path):
    meta = _fake_samples(tmp_path / "a", [(255, 0, 0), (0, 255, 0)], 2)
    _scored(tmp_path / "a")
    rows = [_row("teacher", 28, 0.8, tmp_path / "a"), _row("sCM", 2, 0.7, tmp_path / "a")]
    results = {"rows": rows, "reference_nfe": 28, "targets": B.evaluate_targets(rows), "wall_time_s": 60.0}
    paths = B.write_report(tmp_path, results, meta)
    assert json.loads(paths["results"].read_text())["rows"][1]["overall"] == 0.7
    assert "| sCM | 2 |" in paths["table"].read_text()
    assert "sCM at NFE 2 >= 95% of the teacher at 28 steps: 87.5% — **MISSED**" in paths["table"].read_text()
    for key in ("grid", "plot"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG"
    failures = paths["failures"].read_text().splitlines()
    assert [line.split(" | ")[0] for line in failures[4:]] == ["| Teacher (Euler) @ 28", "| sCM @ 2"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_quick_report_shows_the_committed_full_run_beside_it(tmp_path):
    committed = tmp_path / "committed.md"
    committed.write_text("# Shapes-world distillation benchmark\n\n| Model | NFE |\n|---|---:|\n| sCM | 2 |\n\n"
                         "## Targets\n\n- sCM at NFE 2: met\n")
    beside = B.read_committed_table(committed)
    assert not beside.startswith("# ") and "### Targets" in beside and "| sCM | 2 |" in beside
    meta = _fake_samples(tmp_path / "a", [(255, 0, 0)], 1)
    rows = [_row("teacher", 28, 0.8, _scored(tmp_path / "a"))]
    (tmp_path / "out").mkdir()
    (tmp_path / "plain").mkdir()
    table = B.write_report(tmp_path / "out", {"rows": rows, "committed_full_run": beside}, meta)["table"].read_text()
    assert table.count("| Model |") == 2 and "committed full run" in table
    plain = B.write_report(tmp_path / "plain", {"rows": rows}, meta)["table"].read_text()
    assert plain.count("| Model |") == 1


# --------------------------------------------------------------------------------------------
# Stage runner


def test_runner_skips_finished_stages_and_reruns_changed_ones(tmp_path):
    out = tmp_path / "run"
    target = tmp_path / "target.txt"
    script = f"import pathlib; p = pathlib.Path({str(target)!r}); p.write_text(p.read_text() + 'x' if p.exists() else 'x')"
    runner = B.Runner(out, threads=1, echo=False)
    runner.run("stage", [sys.executable, "-c", script], expect=[target])
    runner.run("stage", [sys.executable, "-c", script], expect=[target])
    assert target.read_text() == "x"  # second call reused
    assert [r.reused for r in runner.records] == [False, True]
    runner.run("stage", [sys.executable, "-c", script + " # changed"], expect=[target])
    assert target.read_text() == "xx"
    target.unlink()  # output gone: the stage runs again even with the same command
    runner.run("stage", [sys.executable, "-c", script + " # changed"], expect=[target])
    assert target.read_text() == "x"
    log = (out / "commands.log").read_text()
    assert log.count("stage:") == 4 and "reused" in log
    other = B.Runner(out, threads=1, echo=False, context="another teacher")
    other.run("stage", [sys.executable, "-c", script + " # changed"], expect=[target])
    assert target.read_text() == "xx" and not other.records[0].reused  # new context: runs again


def test_teacher_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.safetensors").write_bytes(b"1")
    first = B.teacher_fingerprint(tmp_path)
    assert B.teacher_fingerprint(tmp_path) == first
    (tmp_path / "a" / "w.safetensors").write_bytes(b"2")
    assert B.teacher_fingerprint(tmp_path) != first


def test_runner_reports_a_failing_stage(tmp_path):
    runner = B.Runner(tmp_path / "run", threads=1, echo=False)
    with pytest.raises(B.BenchmarkError, match=r"stage bad failed \(exit 3\).*boom"):
        runner.run("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    assert not (tmp_path / "run" / "stages" / "bad.json").exists()
    with pytest.raises(B.BenchmarkError, match="did not write"):
        runner.run("lazy", [sys.executable, "-c", "pass"], expect=[tmp_path / "never"])


def test_benchmark_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        B.main(["--output_dir", "x", "--student_nfes", "0"])
    assert exc.value.code == 2
    assert B.main(["--output_dir", "x", "--scm_steps", "0"]) == 2
    assert "scm_steps must be >= 1" in capsys.readouterr().err


def _rescale_args(tmp_path: Path, config: B.BenchmarkConfig):
    import train_rescale

    stages = B.Stages(B.Runner(tmp_path, threads=1, echo=False), config, tmp_path, tmp_path / "teacher", {},
                      tmp_path / "heldout.jsonl", [], tmp_path / "rescale" / "rescaled.pt")
    return train_rescale.parse_args([str(a) for a in B.render_flags(B.rescale_flags(stages))])


def test_rescale_stage_runs_the_chosen_lr_schedule(tmp_path):
    """The full run's rescale decays the LR as cos to 0 with no warm-up (the trainers' default warm-up of 500
    would swallow a fifth of it); the quick run keeps the constant LR it was measured with."""
    import torch

    from training.launch import build_optimizer

    full = B.config_from_args(B.build_parser().parse_args(["--output_dir", str(tmp_path)]))
    args = _rescale_args(tmp_path, full)
    assert (args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps) == ("cosine", 0, full.rescale_steps)
    optimizer, scheduler = build_optimizer(args, torch.nn.Linear(1, 1))
    n, peak = args.max_train_steps, full.rescale_learning_rate
    for step in range(n):
        expected = peak * 0.5 * (1 + math.cos(math.pi * step / n))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12), step
        optimizer.step()
        scheduler.step()
    quick = B.config_from_args(B.build_parser().parse_args(["--output_dir", str(tmp_path), "--quick"]))
    args = _rescale_args(tmp_path, quick)
    assert (args.lr_scheduler, args.max_train_steps) == ("constant", B.QUICK["rescale_steps"])


# --------------------------------------------------------------------------------------------
# Teacher


def test_warmup_cosine_lr_closed_form():
    assert T.warmup_cosine_lr(0, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert T.warmup_cosine_lr(9, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert T.warmup_cosine_lr(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert T.warmup_cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_teacher_config_validation():
    with pytest.raises(ValueError, match="multiple of 8"):
        replace(T.TeacherConfig(), resolution=60).validate()
    with pytest.raises(ValueError, match="caption_dropout"):
        replace(T.TeacherConfig(), caption_dropout=1.0).validate()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_teacher_build_is_deterministic_and_normalises_latents(tmp_path):
    import torch
    from diffusers import FluxPipeline

    from evaluation.shapes.domain import generate_examples

    info_a = T.build_teacher(tmp_path / "a", _micro_teacher_config(), progress=False)
    T.build_teacher(tmp_path / "b", _micro_teacher_config(), progress=False)
    T.build_teacher(tmp_path / "c", _micro_teacher_config(seed=1), progress=False)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert set(a) >= {"transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    assert a == b  # same seed: identical bytes
    assert a["transformer/diffusion_pytorch_model.safetensors"] != c["transformer/diffusion_pytorch_model.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind

    # The stored pipeline loads with diffusers' own class, in float32, with the FLUX layout.
    pipe = FluxPipeline.from_pretrained(tmp_path / "a")
    assert pipe.transformer.dtype == torch.float32 and pipe.vae_scale_factor == 4
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert T.read_build_info(tmp_path / "a")["config"]["seed"] == 0
    # shift/scale make the posterior means of the training images zero-mean, unit-std (independent
    # numpy recomputation over the same images)
    rows = generate_examples(24, 64, 0, "train")
    images = T._images_from_rows(rows)
    with torch.no_grad():
        mu = pipe.vae.encode(T._to_pixels(images)).latent_dist.mean.double().numpy()
    normalised = (mu - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert normalised.mean() == pytest.approx(0.0, abs=1e-4)
    assert normalised.std() == pytest.approx(1.0, abs=1e-4)
    assert info_a["vae"]["shift_factor"] == pytest.approx(pipe.vae.config.shift_factor)


def test_ensure_teacher_reuses_a_matching_build(tmp_path):
    config = _micro_teacher_config()
    folder, _, rebuilt = T.ensure_teacher(tmp_path / "t", config, progress=False)
    assert rebuilt
    stamp = (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    _, _, rebuilt = T.ensure_teacher(tmp_path / "t", replace(config, eval_samples=3), progress=False)
    assert not rebuilt  # evaluation settings do not change the weights
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    _, info, rebuilt = T.ensure_teacher(tmp_path / "t", replace(config, steps=3), progress=False)
    assert rebuilt and info["config"]["steps"] == 3


# --------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_benchmark_end_to_end_on_a_micro_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    T.build_teacher(teacher, _micro_teacher_config(), progress=False)
    config = replace(B.BenchmarkConfig(), num_images=16, heldout_prompts_per_tag=1, n_samples=1, sample_batch_size=6,
                     teacher_nfes=(1, 2), rescaled_nfes=(2,), student_nfes=(1,), rescale_steps=2,
                     rescale_batch_size=2, scm_steps=2, scm_batch_size=2, meanflow_steps=2, meanflow_batch_size=2,
                     grid_prompts=3)
    out = tmp_path / "bench"
    results = B.run_benchmark(out, config, teacher, echo=False)
    for name in ("results.json", "table.md", "failures.md", "grid.png", "plot.png", "commands.log"):
        assert (out / name).is_file(), name
    # the scorer's floor, measured on the same prompts and image count, is the table's last row
    assert results["chance"]["settings"]["images"] == results["rows"][0]["total_images"]
    table_rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert table_rows[-1].startswith("| Chance (untrained model) | 2 |")
    rows = {(r["model"], r["nfe"]) for r in results["rows"]}
    assert rows == {("teacher", 1), ("teacher", 2), ("rescaled", 2), ("sCM", 1), ("MeanFlow", 1)}
    for row in results["rows"]:
        assert row["total_images"] == 6 and set(row["tasks"]) == set(TAGS)
    assert results["reference_nfe"] == 2
    stages = [c["stage"] for c in results["commands"]]
    assert stages[:4] == ["data", "rescale", "sCM", "MeanFlow"]
    with Image.open(out / "grid.png") as im:
        assert im.size[1] > 5 * 128  # five model@NFE rows
    # a second run reuses every stage and gives the same scores
    beside = B.read_committed_table(B.COMMITTED_TABLE)
    again = B.run_benchmark(out, config, teacher, echo=False, committed_full_run=beside)
    assert all(c["reused"] for c in again["commands"])
    assert [r["overall"] for r in again["rows"]] == [r["overall"] for r in results["rows"]]
    assert "committed full run" in (out / "table.md").read_text()  # what --quick shows beside its own table


# --------------------------------------------------------------------------------------------
# The committed teacher (assets/shapes_teacher) that quickstart and the benchmark reuse


def test_cached_teacher_is_current_and_its_vae_keeps_the_scene():
    """The committed teacher must be the one the build script makes today (else ensure_teacher would
    silently spend ~2.5 h rebuilding it), load offline through diffusers' FluxPipeline, and carry a
    VAE whose reconstructions of fresh held-out images still satisfy their prompts."""
    import torch
    from diffusers import FluxPipeline

    from evaluation.shapes.domain import generate_examples
    from evaluation.shapes.scorer import detect, evaluate

    folder = B.DEFAULT_TEACHER_DIR
    assert (folder / "model_index.json").is_file(), f"{folder} is missing: run python -m evaluation.shapes.teacher"
    info = T.read_build_info(folder)
    assert info is not None
    assert T._config_key(info["config"]) == T._config_key(T.teacher_recipe(T.COMMITTED_RECIPE).to_dict())
    _, reused_info, rebuilt = T.ensure_teacher(folder, progress=False)
    assert not rebuilt and reused_info == info

    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    rows = generate_examples(36, 64, seed=1234, split="heldout")
    images = T._images_from_rows(rows)
    with torch.no_grad():
        latents = pipe.vae.encode(T._to_pixels(images)).latent_dist.mean
        recon = pipe.vae.decode(latents).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    correct = [evaluate(detect(r)[0], json.loads(row["metadata"]))[0] for r, row in zip(recon, rows)]
    assert np.mean(correct) >= 0.9
    # the latent normalisation makes the flow model's data unit-variance (as FLUX's shift/scale)
    normalised = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert float(normalised.std()) == pytest.approx(1.0, abs=0.15)
