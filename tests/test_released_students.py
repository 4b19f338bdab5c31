"""The original release's published students, in its own file format, through our CLIs and exporter.

The release's DeepSpeed bf16 runs saved ``{'module': student.state_dict()}`` (``ckpts/transformer_<step>.pt``)
with its own key names: the sCM student is the FLUX transformer plus ``logvar_linear.*`` (its TrigFlow
wrapper's head), the MeanFlow student names its interval embedder ``timestep_embedder2.*`` (top level),
all tensors bf16, no config.  Here such files are built from the tiny FLUX, sampled through
``test_sCM.py`` / ``test_meanflow.py`` (subprocesses) and ``export_diffusers.py``, and compared with
the same weights in our own export format (config, step, our key names): the images must be identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.loading import LEGACY_RENAMES, CheckpointError, _split_auxiliary, load_flux_transformer, read_checkpoint
from model.pipeline import load_student_transformer
from model.sampling_cli import cli, main
from training.checkpointing import export_transformer

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--resolution", "64", "--max_sequence_length", "32", "--no_progress", "--n_samples", "2"]
OUR_INTERVAL, RELEASE_INTERVAL = "time_text_embed.interval_embedder.", "timestep_embedder2."


def _release_names(state: dict) -> dict:
    """Our key names → the release's (its MeanFlow class holds the interval embedder at the top level)."""
    return {RELEASE_INTERVAL + k[len(OUR_INTERVAL):] if k.startswith(OUR_INTERVAL) else k: v for k, v in state.items()}


@pytest.fixture(scope="module")
def released(tiny_assets, tmp_path_factory):
    """Release-format sCM/MeanFlow files and the same bf16 weights as our own exports."""
    pipe_dir, _ = tiny_assets
    root = tmp_path_factory.mktemp("released")
    tf = load_flux_transformer(str(pipe_dir), 1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" student: not the teacher's weights
        for p in tf.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    bf16 = lambda state: {k: v.to(torch.bfloat16) for k, v in state.items()}  # noqa: E731
    scm = bf16(tf.state_dict())
    scm["logvar_linear.weight"] = torch.randn(1, tf.inner_dim, generator=g).to(torch.bfloat16)
    scm["logvar_linear.bias"] = torch.zeros(1, dtype=torch.bfloat16)
    tf.enable_interval_embedding("copy")
    with torch.no_grad():  # the trained interval embedder differs from the copied timestep embedder
        for p in tf.time_text_embed.interval_embedder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    mf = bf16(tf.state_dict())
    paths = {"pipe": str(pipe_dir)}
    for name, state in (("scm", scm), ("mf", mf)):
        release = root / name / "ckpts" / "transformer_3000.pt"
        release.parent.mkdir(parents=True)
        torch.save({"module": _release_names(state)}, release)
        native_state = {k: v for k, v in state.items() if not k.startswith("logvar_linear.")}
        config = {**dict(tf.config), "interval_embedding": name == "mf"}
        export_transformer(root / name / "native" / "transformer_3000.pt", native_state, config, 3000)
        paths[name], paths[f"{name}_native"] = str(release), str(root / name / "native" / "transformer_3000.pt")
    meta = root / "meta2.jsonl"
    meta.write_text("".join((REPO / "evaluation" / "evaluation_metadata.jsonl").read_text().splitlines(True)[:2]))
    paths["meta"] = str(meta)
    return paths


def test_release_files_have_the_release_layout(released):
    """Guard the fixture itself: the wrapper, the key names and the dtype of the release's files."""
    scm = torch.load(released["scm"], weights_only=True)
    mf = torch.load(released["mf"], weights_only=True)
    assert list(scm) == ["module"] and list(mf) == ["module"]
    assert {"logvar_linear.weight", "logvar_linear.bias"} <= set(scm["module"])
    assert {f"{RELEASE_INTERVAL}linear_1.weight", f"{RELEASE_INTERVAL}linear_2.bias"} <= set(mf["module"])
    assert not any(k.startswith(OUR_INTERVAL) for k in mf["module"])
    assert {v.dtype for v in {**scm["module"], **mf["module"]}.values()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------- key mapping
def test_read_checkpoint_maps_the_release_names():
    w1, w2, head = torch.randn(4, 3).bfloat16(), torch.randn(3, 3).bfloat16(), torch.randn(1, 3).bfloat16()
    state = {"timestep_embedder2.linear_1.weight": w1, "time_text_embed.timestep_embedder.linear_1.weight": w2,
             "logvar_linear.weight": head, "x_embedder.weight": w2}
    assert LEGACY_RENAMES == {RELEASE_INTERVAL: OUR_INTERVAL}
    main_part, aux = _split_auxiliary(state)
    assert set(main_part) == {"time_text_embed.interval_embedder.linear_1.weight",
                              "time_text_embed.timestep_embedder.linear_1.weight", "x_embedder.weight"}
    assert set(aux) == {"logvar_linear.weight"}
    # Same tensors, same dtype: the mapping renames, it does not copy or cast.
    assert main_part["time_text_embed.interval_embedder.linear_1.weight"] is w1 and aux["logvar_linear.weight"] is head


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_legacy_names_load_from_pt_and_safetensors(tmp_path, fmt):
    state = {"timestep_embedder2.linear_2.bias": torch.arange(3.0).bfloat16(), "proj_out.bias": torch.ones(2)}
    path = tmp_path / f"transformer_9.{fmt}"
    torch.save({"module": state}, path) if fmt == "pt" else save_file(state, path)
    ckpt = read_checkpoint(path)
    assert set(ckpt.state_dict) == {"time_text_embed.interval_embedder.linear_2.bias", "proj_out.bias"}
    assert ckpt.config is None and ckpt.auxiliary == {}
    assert torch.equal(ckpt.state_dict["time_text_embed.interval_embedder.linear_2.bias"], state["timestep_embedder2.linear_2.bias"])


def test_both_names_of_the_interval_embedder_are_refused(tmp_path):
    state = {"timestep_embedder2.linear_1.bias": torch.zeros(2),
             "time_text_embed.interval_embedder.linear_1.bias": torch.ones(2)}
    torch.save({"module": state}, tmp_path / "both.pt")
    with pytest.raises(CheckpointError, match="both"):
        read_checkpoint(tmp_path / "both.pt")


def test_release_meanflow_file_loads_its_interval_embedder_strictly(released):
    tf, ckpt = load_student_transformer(released["mf"], released["pipe"], method="meanflow")
    assert tf.timestep_scale == 1.0 and tf.config.interval_embedding  # the release's students are ×1 models
    raw = torch.load(released["mf"], weights_only=True)["module"]
    for name, param in tf.time_text_embed.interval_embedder.named_parameters():
        assert torch.equal(param, raw[RELEASE_INTERVAL + name].float()), name
    assert ckpt.step is None  # the sampler takes it from the file name (transformer_3000.pt)


# --------------------------------------------------------------------------- through our CLIs
def _run_cli(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


RELEASE_SETTINGS = {"scm": ("scm", "test_sCM.py", "2", "4.5"), "mf": ("meanflow", "test_meanflow.py", "4", "3.5")}


def _sampling(released, steps, guidance) -> list[str]:
    return ["--metadata_file", released["meta"], "--num_inference_steps", steps, "--guidance_scale", guidance, *SMALL]


@pytest.fixture(scope="module")
def native_images(released, tmp_path_factory):
    """Images of the native exports with the release's steps and guidance (the reference)."""
    images = {}
    for method, (cli_method, _, steps, guidance) in RELEASE_SETTINGS.items():
        out = tmp_path_factory.mktemp(f"native_{method}")
        main(cli_method, ["--pretrained_model_name_or_path", released["pipe"], *_sampling(released, steps, guidance),
                          "--resume_path", released[f"{method}_native"], "--output_dir", str(out / "images")])
        images[method] = _pngs(out / "images")
        assert len(images[method]) == 4
    return images


@pytest.mark.parametrize("method", ["scm", "mf"])
def test_release_file_samples_and_exports_like_the_native_export(released, native_images, tmp_path, monkeypatch,
                                                                 method):
    """The README's sampling and export commands (the release's steps and guidance) on a release-format file."""
    from export_diffusers import main as export_main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cli_method, _, steps, guidance = RELEASE_SETTINGS[method]
    sampling = _sampling(released, steps, guidance)
    report = main(cli_method, ["--pretrained_model_name_or_path", released["pipe"], *sampling,
                               "--resume_path", released[method], "--output_dir", str(tmp_path / "release")])
    assert report is not None
    assert _pngs(tmp_path / "release") == native_images[method]
    # export_diffusers.py on the release's file: a diffusers folder with our names, bf16 as saved, same images.
    export_main(["--method", cli_method, "--checkpoint", released[method], "--pretrained_model_name_or_path",
                 released["pipe"], "--output_dir", str(tmp_path / "export")])
    weights = load_file(tmp_path / "export" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert not any(k.startswith((RELEASE_INTERVAL, "logvar_linear.")) for k in weights)
    assert any(k.startswith(OUR_INTERVAL) for k in weights) == (method == "mf")
    assert json.loads((tmp_path / "export" / "export_info.json").read_text())["step"] == 3000  # from the file name
    main(cli_method, [*sampling, "--resume_path", str(tmp_path / "export"), "--output_dir", str(tmp_path / "exported")])
    assert _pngs(tmp_path / "exported") == native_images[method]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["scm", "mf"])
def test_release_file_through_the_cli_scripts(released, native_images, tmp_path, method):
    """``python test_sCM.py`` / ``python test_meanflow.py`` as the README runs them (a fresh process each)."""
    _, script, steps, guidance = RELEASE_SETTINGS[method]
    proc = _run_cli(script, ["--pretrained_model_name_or_path", released["pipe"], *_sampling(released, steps, guidance),
                             "--resume_path", released[method], "--output_dir", str(tmp_path / "release")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _pngs(tmp_path / "release") == native_images[method]


# --------------------------------------------------------------------------------- wrong use
@pytest.mark.parametrize("method, file, expected", [("meanflow", "scm", "test_sCM.py"), ("scm", "mf", "test_meanflow.py"),
                                                    ("teacher", "scm", "test_sCM.py"),
                                                    ("teacher", "mf", "test_meanflow.py")])
def test_release_file_to_the_wrong_sampler_is_one_line(released, tmp_path, capsys, method, file, expected):
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", released["pipe"], "--resume_path", released[file], "--output_dir",
            str(out), "--metadata_file", released["meta"], *SMALL]
    assert cli(method, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and expected in err[0] and released[file] in err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def bigger_teacher(tiny_assets, tmp_path_factory):
    """The tiny pipeline with one more double-stream block (as FLUX.1-dev 12B has 19 where lite-8B has 8)."""
    pipe_dir, _ = tiny_assets
    other = tmp_path_factory.mktemp("bigger") / "pipe"
    other.mkdir()
    for item in pipe_dir.iterdir():
        if item.name != "transformer":
            (other / item.name).symlink_to(item)
    tf = load_flux_transformer(str(pipe_dir), 1.0)
    config = {k: v for k, v in tf.config.items() if not k.startswith("_")}
    bigger = type(tf).from_config({**config, "num_layers": config["num_layers"] + 1})
    bigger.save_pretrained(other / "transformer")
    return str(other)


@pytest.mark.parametrize("method, file", [("scm", "scm"), ("meanflow", "mf")])
def test_release_file_with_a_teacher_of_another_size_is_one_line(released, bigger_teacher, tmp_path, capsys,
                                                                   method, file):
    out = tmp_path / "out"
    args = ["--pretrained_model_name_or_path", bigger_teacher, "--resume_path", released[file], "--output_dir",
            str(out), "--metadata_file", released["meta"], *SMALL]
    assert cli(method, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and len(err) == 2  # the message + the debug hint
    assert "missing keys" in err[0] and "transformer_blocks.2." in err[0]
    assert bigger_teacher in err[0] and "distilled from" in err[0]
    assert not out.exists()
    from export_diffusers import main as export_main

    with pytest.raises(CheckpointError, match="distilled from"):
        export_main(["--method", method, "--checkpoint", released[file], "--pretrained_model_name_or_path",
                     bigger_teacher, "--output_dir", str(tmp_path / "export")])
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("file, expected", [("scm", "test_sCM.py"), ("mf", "test_meanflow.py")])
def test_release_student_as_rescaled_teacher_is_refused(released, file, expected):
    """A released student passed to a trainer as --rescaled_checkpoint_path: refused, naming the right tool."""
    from model.loading import load_transformer_weights

    with pytest.raises(CheckpointError, match=expected):
        load_transformer_weights(load_flux_transformer(released["pipe"], 1.0), released[file])
