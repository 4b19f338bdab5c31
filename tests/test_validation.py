"""Validation images (training/validation.py): they leave the training stream alone (same losses, same
weights, exact resume), the grid holds the real few-step samplers' images (a tile equals the sampling CLI's
image of the exported weights), and bad flags fail up front."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fault_injection import load_export, read_events, read_metrics, scm_args, scm_argv, scm_method
from train_sCM import parse_args
from training.core import train

PROMPTS = ("a red square", "two blue circles")


def _grid_tiles(path: Path, rows: int, cols: int, size: int) -> list[list[np.ndarray]]:
    grid = np.asarray(Image.open(path).convert("RGB"))
    margin = grid.shape[1] - cols * size
    assert grid.shape == (rows * size, margin + cols * size, 3) and margin > 0
    return [[grid[r * size:(r + 1) * size, margin + c * size:margin + (c + 1) * size] for c in range(cols)]
            for r in range(rows)]


def test_validation_keeps_losses_and_resume_exact_and_matches_the_sampling_cli(tiny_assets, tmp_path, monkeypatch):
    pipe, data = tiny_assets
    flags = dict(max_train_steps=4, checkpointing_steps=2)
    plain_args = scm_args(pipe, data, tmp_path / "plain", **flags)
    train(plain_args, scm_method(plain_args))

    val_flags = dict(flags, validation_steps=2, num_validation_images=2)
    out = tmp_path / "val"
    argv_prompts = [x for p in PROMPTS for x in ("--validation_prompt", p)]
    args = parse_args(scm_argv(pipe, data, out, **val_flags) + argv_prompts)
    train(args, scm_method(args))

    ref, got = read_metrics(tmp_path / "plain"), read_metrics(out)
    assert [got[s]["loss_sCM"] for s in sorted(got)] == [ref[s]["loss_sCM"] for s in sorted(ref)]
    plain_weights, weights = load_export(tmp_path / "plain", 4), load_export(out, 4)
    assert all((plain_weights[k] == v).all() for k, v in weights.items())
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step_0000002.png", "step_0000004.png"]
    assert [e["step"] for e in read_events(out) if e["event"] == "validation"] == [2, 4]
    tiles = _grid_tiles(out / "validation" / "step_0000004.png", rows=2, cols=4, size=32)
    assert not np.array_equal(tiles[0][0], tiles[1][0])  # 1 step and 2 steps differ
    assert not np.array_equal(tiles[0][0], tiles[0][1])  # image k = 0 and 1 of a prompt differ (own seeds)

    # Independent reference: the sampling CLI on the step-4 export, same seed, prompt and steps.
    from model.sampling_cli import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for row, steps in enumerate((1, 2)):
        cli_out = tmp_path / f"cli{steps}"
        main("scm", ["--pretrained_model_name_or_path", str(pipe), "--resume_path", str(out / "ckpts" / "transformer_4.pt"),
                     "--output_dir", str(cli_out), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--n_samples", "2",
                     "--resolution", "32", "--max_sequence_length", "256", "--num_inference_steps", str(steps),
                     "--no_progress"])
        for i in range(2):
            for k in range(2):
                cli = np.asarray(Image.open(cli_out / f"{i:05d}" / "samples" / f"{k:04d}.png").convert("RGB"))
                # ≤ 1 grey level: the CLI batches both prompts in one call, validation one prompt per call.
                assert np.abs(cli.astype(int) - tiles[row][2 * i + k].astype(int)).max() <= 1, (steps, i, k)

    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    resumed_args = parse_args(scm_argv(pipe, data, resumed, resume_from_checkpoint="latest", **val_flags) + argv_prompts)
    train(resumed_args, scm_method(resumed_args))
    again = read_metrics(resumed)
    assert [again[s]["loss_sCM"] for s in (3, 4)] == [ref[s]["loss_sCM"] for s in (3, 4)]
    assert np.array_equal(np.asarray(Image.open(resumed / "validation" / "step_0000004.png")),
                          np.asarray(Image.open(out / "validation" / "step_0000004.png")))


@pytest.mark.parametrize("flags,message", [
    ({"validation_prompts_file": "/nonexistent/prompts.txt"}, "--validation_prompts_file not found"),
    ({"validation_prompt": "a cat", "validation_steps": 0}, "--validation_steps"),
    ({"validation_prompt": "a cat", "num_validation_images": 0}, "--num_validation_images"),
])
def test_bad_validation_flags_fail_before_anything_is_written(tiny_assets, tmp_path, flags, message):
    pipe, data = tiny_assets
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        args = scm_args(pipe, data, tmp_path / "out", **flags)
        train(args, scm_method(args))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("trainer", ["train_meanflow", "train_rescale"])
def test_meanflow_and_rescale_validation_grids(tiny_assets, tmp_path, trainer):
    """MeanFlow: rows 2 and 4 steps; rescale: the x1000 teacher and the rescaled student at 28 steps (the
    student after one update is close to, but not, the teacher)."""
    import importlib

    pipe, data = tiny_assets
    module = importlib.import_module(trainer)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data), "--resolution", "32",
            "--train_batch_size", "2", "--max_train_steps", "1", "--checkpointing_steps", "1", "--report_to", "none",
            "--output_dir", str(out), "--validation_prompt", PROMPTS[0], "--validation_steps", "1",
            "--num_validation_images", "1"]
    if trainer == "train_meanflow":
        argv += ["--timestep_scale", "1000"]
    module.main(argv)
    tiles = _grid_tiles(out / "validation" / "step_0000001.png", rows=2, cols=1, size=32)
    assert not np.array_equal(tiles[0][0], tiles[1][0])
    assert all(tile.std() > 0 for row in tiles for tile in row)  # real images, not blank tiles


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_validation_on_rank_0_only_keeps_losses(tiny_assets, tmp_path):
    """2-process DDP: rank 0 samples while rank 1 waits at the next all-reduce; losses equal a run without."""
    from fault_injection import torchrun

    pipe, data = tiny_assets

    def run(out, **flags):
        torchrun(scm_argv(pipe, data, out, max_train_steps=2, checkpointing_steps=2, **flags), nproc=2,
                 timeout=300, ACCELERATE_USE_CPU="true")

    run(tmp_path / "plain")
    run(tmp_path / "val", validation_prompt=PROMPTS[0], validation_steps=1, num_validation_images=1)
    ref, got = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "val")
    assert [got[s]["loss_sCM"] for s in (1, 2)] == [ref[s]["loss_sCM"] for s in (1, 2)]
    assert sorted(p.name for p in (tmp_path / "val" / "validation").iterdir()) == ["step_0000001.png", "step_0000002.png"]


def test_validation_with_ema_adds_ema_rows_and_restores_the_weights(tiny_assets, tmp_path, monkeypatch):
    """--use_ema: rows sCM 1/2 steps then EMA sCM 1/2 steps; the EMA rows are the sampling CLI's --use_ema images;
    the raw weights are restored bit for bit (same losses and raw export as a run without validation)."""
    pipe, data = tiny_assets
    flags = dict(max_train_steps=2, checkpointing_steps=2, use_ema=True, ema_decay=0.5)
    plain_args = scm_args(pipe, data, tmp_path / "plain", **flags)
    train(plain_args, scm_method(plain_args))
    out = tmp_path / "val"
    args = scm_args(pipe, data, out, validation_prompt=PROMPTS[0], validation_steps=1, num_validation_images=1,
                    **flags)
    train(args, scm_method(args))
    ref, got = read_metrics(tmp_path / "plain"), read_metrics(out)
    assert [got[s]["loss_sCM"] for s in (1, 2)] == [ref[s]["loss_sCM"] for s in (1, 2)]
    plain_weights, weights = load_export(tmp_path / "plain", 2), load_export(out, 2)
    assert all((plain_weights[k] == v).all() for k, v in weights.items())

    tiles = _grid_tiles(out / "validation" / "step_0000002.png", rows=4, cols=1, size=32)
    assert not np.array_equal(tiles[0][0], tiles[2][0])  # EMA ≠ raw

    from model.sampling_cli import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    main("scm", ["--pretrained_model_name_or_path", str(pipe), "--resume_path", str(out / "ckpts" / "transformer_2.pt"),
                 "--use_ema", "--output_dir", str(tmp_path / "cli"), "--prompt", PROMPTS[0], "--n_samples", "1",
                 "--resolution", "32", "--num_inference_steps", "1", "--no_progress"])
    cli = np.asarray(Image.open(tmp_path / "cli" / "00000" / "samples" / "0000.png").convert("RGB"))
    assert np.abs(cli.astype(int) - tiles[2][0].astype(int)).max() <= 1


def test_lora_rescale_validation_renders_the_x1000_teacher_as_the_stock_pipeline(tiny_assets, tmp_path):
    """--lora_rank rescale: the teacher row is the shared transformer with adapters off at ×1000, i.e. the stock
    model: its tile equals diffusers' own FluxPipeline of the same folder for the same seed (to a grey level)."""
    import torch
    from diffusers import FluxPipeline

    import train_rescale
    from evaluation.generate import image_generators

    pipe, data = tiny_assets
    out = tmp_path / "out"
    train_rescale.main(["--pretrained_model_name_or_path", str(pipe), "--data_dir", str(data), "--resolution", "32",
                        "--train_batch_size", "2", "--max_train_steps", "1", "--checkpointing_steps", "1",
                        "--report_to", "none", "--learning_rate", "1e-2", "--lora_rank", "2", "--output_dir", str(out),
                        "--validation_prompt", PROMPTS[0], "--validation_steps", "1", "--num_validation_images", "2",
                        "--validation_seed", "7"])
    tiles = _grid_tiles(out / "validation" / "step_0000001.png", rows=2, cols=2, size=32)
    stock = FluxPipeline.from_pretrained(str(pipe), torch_dtype=torch.float32)
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = stock(prompt=[PROMPTS[0]] * 2, height=32, width=32, num_inference_steps=28, guidance_scale=3.5,
                       generator=image_generators(7, [(0, 0), (0, 1)]), max_sequence_length=256,
                       output_type="np").images
    for k in range(2):
        reference = (np.clip(images[k], 0, 1) * 255).round().astype(int)
        assert np.abs(tiles[0][k].astype(int) - reference).max() <= 1, k
    assert not np.array_equal(tiles[0][0], tiles[1][0])  # the rescaled student's row is another model
