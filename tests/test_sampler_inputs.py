"""Bad or suspicious input to the sampling CLIs (test_sCM.py / test_meanflow.py / test_flux8b.py) and to
export_diffusers.py: one line on stderr naming the fix, exit status 2, nothing half-written; warnings for
legal but suspicious values."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from model.loading import load_flux_transformer
from model.sampling_cli import cli
from training.checkpointing import export_transformer

SMALL = ["--resolution", "64", "--max_sequence_length", "32", "--no_progress", "--n_samples", "1"]


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    """A training run's layout: OUT/ckpts/transformer_5.pt and OUT/checkpoints/checkpoint-5/run_config.json."""
    pipe, _ = tiny_assets
    out = tmp_path_factory.mktemp("sampler_inputs") / "run"
    tf = load_flux_transformer(str(pipe), 1.0)
    export_transformer(out / "ckpts" / "transformer_5.pt", tf.state_dict(), dict(tf.config), 5)
    state = out / "checkpoints" / "checkpoint-5"
    state.mkdir(parents=True)
    (state / "run_config.json").write_text(json.dumps({"method": "sCM", "scm_cfg_scale": [4.0, 4.5, 5.0], "step": 5}))
    return dict(pipe=str(pipe), out=out, export=out / "ckpts" / "transformer_5.pt", state=state)


def _sample(run, output_dir, *extra, capsys, resume=None) -> tuple[int, list[str]]:
    argv = ["--pretrained_model_name_or_path", run["pipe"], "--resume_path", str(resume or run["export"]),
            "--output_dir", str(output_dir), *SMALL, *extra]
    code = cli("scm", argv)
    return code, _messages(capsys.readouterr().err)


def _messages(err: str) -> list[str]:
    """The error/warning lines of stderr (progress bars of the loaders aside), errors first."""
    lines = err.splitlines()
    return [line for line in lines if line.startswith("error:")] + [line for line in lines if line.startswith("warning:")]


def _argparse_exit(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli("scm", argv)
    return info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_guidance_is_refused(run, tmp_path, capsys, value):
    code, line = _argparse_exit(["--resume_path", str(run["export"]), "--output_dir", str(tmp_path / "o"),
                                 "--guidance_scale", value], capsys)
    assert code == 2 and f"--guidance_scale must be a finite number, got {value}" in line
    assert not (tmp_path / "o").exists()


def test_empty_prompt_needs_a_flag(run, tmp_path, capsys):
    code, err = _sample(run, tmp_path / "o", "--prompt", "  ", capsys=capsys)
    assert code == 2
    assert err[0].startswith("error: prompt 0 is empty (1 empty of 1); pass --allow_empty_prompt"), err
    assert not (tmp_path / "o").exists()
    code, err = _sample(run, tmp_path / "o", "--prompt", "", "--allow_empty_prompt", capsys=capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "00000" / "samples" / "0000.png").is_file()


def test_guidance_outside_the_trained_range_warns_once(run, tmp_path, capsys):
    code, err = _sample(run, tmp_path / "o", "--prompt", "a red circle", "--guidance_scale", "-3", capsys=capsys)
    assert code == 0, err
    warnings = [line for line in err if line.startswith("warning:")]
    assert warnings == [f"warning: --guidance_scale -3 is outside the guidance range this checkpoint was trained on "
                        f"[4, 5] ({run['state'] / 'run_config.json'}); the images are an extrapolation"]
    code, err = _sample(run, tmp_path / "o2", "--prompt", "a red circle", "--guidance_scale", "4.5", capsys=capsys)
    assert code == 0 and not [line for line in err if line.startswith("warning:")]


def test_training_state_folder_names_the_export(run, tmp_path, capsys):
    code, err = _sample(run, tmp_path / "o", "--prompt", "a red circle", resume=run["state"], capsys=capsys)
    assert code == 2
    assert err[0] == (f"error: {run['state']} is a full training state (for --resume_from_checkpoint), not a model "
                      f"export: use {run['export']}")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_kib, read_only) -> a tmpfs folder (skips where mounting is not allowed)."""
    mounts = []

    def mount(size_kib: int, read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        options = f"size={size_kib}k" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_output_disk_fails_before_loading(run, small_disk, capsys):
    disk = small_disk(64, read_only=True)
    code, err = _sample(run, disk / "o", "--prompt", "a red circle", capsys=capsys)
    assert code == 2
    assert err[0].startswith(f"error: --output_dir {disk / 'o'} is not writable"), err
    assert list(disk.iterdir()) == []


def test_full_output_disk_is_one_line_and_leaves_no_partial_file(run, small_disk, capsys):
    disk = small_disk(24)
    code, err = _sample(run, disk / "o", "--prompt", "a red circle", "--prompt", "a blue square", "--n_samples", "4",
                        capsys=capsys)
    assert code == 2
    assert err[0].startswith("error: could not write ") and "No space left on device" in err[0], err
    assert "rerun the same command" in err[0]
    assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]  # PNGs are written atomically


@pytest.mark.parametrize("read_only,reason", [(False, "No space left on device"), (True, "Read-only file system")],
                         ids=["full", "read_only"])
def test_export_diffusers_on_a_refusing_disk(run, small_disk, capsys, read_only, reason):
    import export_diffusers
    from training.cli import run_cli

    disk = small_disk(64, read_only=read_only)
    code = run_cli(lambda: export_diffusers.main(["--method", "scm", "--checkpoint", str(run["export"]),
                                                  "--pretrained_model_name_or_path", run["pipe"],
                                                  "--output_dir", str(disk / "exported")]))
    err = _messages(capsys.readouterr().err)
    assert code == 2
    assert err[0].startswith("error: could not write ") and reason in err[0], err
    assert list(disk.iterdir()) == []  # the temporary export folder is gone


def test_from_checkpoint_accepts_a_loaded_pipeline(run):
    """`SCMFluxPipeline.from_checkpoint(pipeline, "transformer_5.pt")`, as the README writes it: the teacher
    pipeline's components are shared and the images equal those of the path form."""
    import torch
    from diffusers import FluxPipeline

    from model.pipeline import SCMFluxPipeline

    teacher = FluxPipeline.from_pretrained(run["pipe"])
    from_object = SCMFluxPipeline.from_checkpoint(teacher, run["export"])
    from_path = SCMFluxPipeline.from_checkpoint(run["pipe"], run["export"])
    assert from_object.vae is teacher.vae and from_object.text_encoder_2 is teacher.text_encoder_2
    assert from_object.checkpoint_step == 5
    images = [p("a red circle", height=64, width=64, num_inference_steps=2, max_sequence_length=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images for p in (from_object, from_path)]
    assert np.array_equal(images[0], images[1])
