"""--report_to: tensorboard event files hold every logged scalar and the validation images (read back with
tensorboard's EventAccumulator); wandb offline writes its run folder under the output folder only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT
from fault_injection import read_metrics, scm_argv, subprocess_env


def _event_files(root):
    return sorted(root.rglob("events.out.tfevents.*"))


def test_tensorboard_has_scalars_config_and_validation_images(tiny_assets, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train_sCM import main

    pipe, data = tiny_assets
    out = tmp_path / "run"
    main(scm_argv(pipe, data, out, max_train_steps=2, checkpointing_steps=2, report_to="tensorboard",
                  validation_prompt="a red square", validation_steps=2, num_validation_images=1))
    files = _event_files(out / "logs")
    assert files, f"no event files under {out / 'logs'}"
    scalars, images = {}, {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["images"]:
            images[tag] = acc.Images(tag)
    metrics = read_metrics(out)
    expected = {"loss_sCM", "l2_loss", "g_norm", "mean_weight", "logvar", "lr", "grad_norm", "samples_per_s",
                "skipped_nonfinite", "bad_samples", "step_time"}
    assert expected <= set(scalars), sorted(scalars)
    for tag in expected:
        assert [s for s, _ in scalars[tag]] == [1, 2]
        assert [v for _, v in scalars[tag]] == pytest.approx([metrics[s][tag] for s in (1, 2)], rel=1e-6)
    assert metrics[2]["samples_per_s"] > 0
    assert [e.step for e in images["validation"]] == [2]
    from PIL import Image
    import io

    logged = np.asarray(Image.open(io.BytesIO(images["validation"][0].encoded_image_string)).convert("RGB"))
    saved = np.asarray(Image.open(out / "validation" / "step_0000002.png").convert("RGB"))
    assert np.array_equal(logged, saved)
    # the config, once (add_hparams writes it into its own event file)
    assert any("learning_rate" in f.read_bytes().decode("latin-1") for f in files)


@pytest.mark.slow  # wandb's service start-up alone takes ~30 s on 2 busy cores
def test_wandb_offline_run_folder_lives_under_the_output_dir(tiny_assets, tmp_path):
    pipe, data = tiny_assets
    out, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, str(REPO_ROOT / "train_sCM.py"),
           *scm_argv(pipe, data, out, max_train_steps=1, checkpointing_steps=1, report_to="wandb")]
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no OUT/wandb"
    assert list(cwd.iterdir()) == []  # nothing in the directory the command was started from
    assert not (REPO_ROOT / "wandb").exists()
    history = list(runs[0].glob("*.wandb"))
    assert history and history[0].stat().st_size > 0
    assert "loss_sCM" in history[0].read_bytes().decode("latin-1")
