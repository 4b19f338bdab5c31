"""The sampling CLIs (test_sCM.py / test_meanflow.py / test_flux8b.py via model/sampling_cli.py) and the
GenEval folder writer (evaluation/generate.py), end to end on the tiny FLUX pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from evaluation.generate import image_seed, plan_groups
from evaluation.geneval_layout import check_folder, read_metadata
from model.loading import load_flux_transformer
from model.sampling_cli import cli, main
from training.checkpointing import export_transformer

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--resolution", "64", "--max_sequence_length", "32", "--no_progress"]


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    pipe_dir, _ = tiny_assets
    root = tmp_path_factory.mktemp("cli")
    tf = load_flux_transformer(str(pipe_dir), 1.0)
    state = dict(tf.state_dict())
    state["logvar_linear.weight"], state["logvar_linear.bias"] = torch.randn(1, tf.inner_dim), torch.zeros(1)
    export_transformer(root / "scm" / "transformer_5.pt", state, dict(tf.config), 5)
    tf.enable_interval_embedding("copy")
    export_transformer(root / "mf" / "transformer_7.pt", tf.state_dict(), dict(tf.config), 7)
    meta = root / "meta3.jsonl"
    meta.write_text("".join((REPO / "evaluation" / "evaluation_metadata.jsonl").read_text().splitlines(True)[:3]))
    return dict(pipe=str(pipe_dir), scm=str(root / "scm" / "transformer_5.pt"), mf=str(root / "mf" / "transformer_7.pt"),
                meta=str(meta), rows=read_metadata(meta))


def _scm_args(setup, out, *extra):
    return ["--pretrained_model_name_or_path", setup["pipe"], "--resume_path", setup["scm"], "--output_dir", str(out),
            "--metadata_file", setup["meta"], *SMALL, *extra]


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_geneval_folder_layout_and_rerun_writes_nothing(setup, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "geneval"
    report = main("scm", _scm_args(setup, out, "--n_samples", "3", "--batch_size", "2", "--grid"))
    assert report.images_written == 9 and report.nfe == 2
    expected = {"generation_config.json"} | {
        f"{i:05d}/{name}" for i in range(3) for name in ["metadata.jsonl", "grid.png", *(f"samples/{k:04d}.png" for k in range(3))]}
    files = _files(out)
    assert set(files) == expected
    for i, row in enumerate(setup["rows"]):
        text = (out / f"{i:05d}" / "metadata.jsonl").read_text()
        assert len(text.strip().splitlines()) == 1 and json.loads(text) == row
    assert check_folder(out, setup["rows"], n_samples=3) == []
    assert Image.open(out / "00000" / "grid.png").size == (128, 128)  # 3 samples on a 2×2 grid of 64² tiles
    assert json.loads((out / "generation_config.json").read_text())["checkpoint_step"] == 5

    again = main("scm", _scm_args(setup, out, "--n_samples", "3", "--batch_size", "2", "--grid"))
    assert again.images_written == 0 and again.images_skipped == 9
    assert _files(out) == files  # same files, same mtimes

    # Resume after losing one sample and one metadata file: only those are rewritten, identically.
    lost = out / "00001" / "samples" / "0001.png"  # shares its batch with 0000.png, which must stay untouched
    before = _pixels(lost)
    lost.unlink()
    (out / "00002" / "metadata.jsonl").unlink()
    third = main("scm", _scm_args(setup, out, "--n_samples", "3", "--batch_size", "2", "--grid"))
    assert third.images_written == 1
    np.testing.assert_array_equal(_pixels(lost), before)
    after = _files(out)
    changed = {k for k in after if after[k] != files[k]}
    assert changed == {"00001/samples/0001.png", "00002/metadata.jsonl"}

    # Other settings into the same folder are refused before anything is written.
    assert cli("scm", _scm_args(setup, out, "--n_samples", "3", "--guidance_scale", "3.0")) == 2
    assert _files(out) == after


def test_two_ranks_write_the_same_images_as_one(setup, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out: _scm_args(setup, out, "--n_samples", "2", "--batch_size", "4")  # 2 prompts per batch
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    main("scm", args(one))
    monkeypatch.setenv("WORLD_SIZE", "2")
    written = []
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        written.append(main("scm", args(two)).images_written)
    assert written == [2, 4]  # rank 0: prompts 0-1, rank 1: prompt 2
    assert _files(one).keys() == _files(two).keys()
    for name in _files(one):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_seed_zero_is_an_ordinary_seed_and_images_differ_per_sample(setup, tmp_path):
    a, b, c = (main("scm", _scm_args(setup, tmp_path / n, "--seed", s, "--n_samples", "2", "--max_prompts", "1"))
               for n, s in (("a", "0"), ("b", "0"), ("c", "42")))
    assert a.images_written == b.images_written == 2
    sample = lambda n, k: _pixels(tmp_path / n / "00000" / "samples" / f"{k:04d}.png")
    np.testing.assert_array_equal(sample("a", 0), sample("b", 0))
    assert not np.array_equal(sample("a", 0), sample("c", 0))
    assert not np.array_equal(sample("a", 0), sample("a", 1))


def test_teacher_cli_matches_diffusers_flux_pipeline(setup, tmp_path):
    out = tmp_path / "teacher"
    prompts = ["a photo of a red circle", "two green squares"]
    argv = ["--pretrained_model_name_or_path", setup["pipe"], "--output_dir", str(out), "--n_samples", "2",
            "--batch_size", "4", "--seed", "3", *SMALL, *sum((["--prompt", p] for p in prompts), [])]
    report = main("teacher", argv)
    assert report.nfe == 28
    pipe = FluxPipeline.from_pretrained(setup["pipe"])
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(image_seed(3, i, k)) for k in range(2)]
        images = pipe([prompt] * 2, height=64, width=64, num_inference_steps=28, guidance_scale=3.5, generator=gens,
                      max_sequence_length=32).images
        for k, image in enumerate(images):
            # The CLI batches 4 images, diffusers 2 here: float32 sums in another order may flip the
            # 8-bit rounding of a few pixels by one level, never more.
            diff = np.abs(_pixels(out / f"{i:05d}" / "samples" / f"{k:04d}.png").astype(int) - np.asarray(image))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == {"prompt": prompt}


def test_meanflow_cli_and_exported_folder_give_the_same_images(setup, tmp_path):
    from export_diffusers import main as export_main

    a, b = tmp_path / "from_pt", tmp_path / "from_folder"
    common = ["--output_dir", None, "--metadata_file", setup["meta"], "--max_prompts", "2", "--n_samples", "2", *SMALL]
    common_for = lambda out: [str(out) if x is None else x for x in common]
    main("meanflow", ["--pretrained_model_name_or_path", setup["pipe"], "--resume_path", setup["mf"], *common_for(a)])
    export_main(["--method", "meanflow", "--checkpoint", setup["mf"], "--pretrained_model_name_or_path", setup["pipe"],
                 "--output_dir", str(tmp_path / "export")])
    main("meanflow", ["--resume_path", str(tmp_path / "export"), *common_for(b)])
    names = [n for n in _files(a) if n.endswith(".png")]
    assert len(names) == 4
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_plan_groups_is_independent_of_what_exists():
    assert plan_groups(3, 2, 4) == [[[(0, 0), (0, 1), (1, 0), (1, 1)]], [[(2, 0), (2, 1)]]]
    assert plan_groups(1, 4, 3) == [[[(0, 0), (0, 1), (0, 2)], [(0, 3)]]]
    assert len({image_seed(0, i, k) for i in range(50) for k in range(4)}) == 200


# --------------------------------------------------------------------------------------- bad input


def _bad_metadata(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "single_object", "prompt": "a cat"}\n{"tag": "single_object"}\n')
    return str(bad)


@pytest.mark.parametrize("case", ["missing_ckpt", "meanflow_ckpt", "scm_ckpt_to_meanflow", "wrong_shapes",
                                  "no_prompt", "bad_resolution"])
def test_bad_input_fails_cleanly(setup, tmp_path, capsys, case):
    out = tmp_path / "out"
    method, args = "scm", _scm_args(setup, out)
    if case == "missing_ckpt":
        args[args.index("--resume_path") + 1] = str(tmp_path / "nope.pt")
    elif case == "meanflow_ckpt":
        args[args.index("--resume_path") + 1] = setup["mf"]
    elif case == "scm_ckpt_to_meanflow":
        method = "meanflow"
    elif case == "wrong_shapes":
        from tests.model_factory import tiny_transformer

        torch.save({"module": tiny_transformer().state_dict()}, tmp_path / "transformer_1.pt")
        args[args.index("--resume_path") + 1] = str(tmp_path / "transformer_1.pt")
    elif case == "no_prompt":
        args[args.index("--metadata_file") + 1] = _bad_metadata(tmp_path)
    elif case == "bad_resolution":
        args[args.index("--resolution") + 1] = "72"
    assert cli(method, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and len(err) == 2  # the message + the debug hint
    expected = {"missing_ckpt": "not found", "meanflow_ckpt": "test_meanflow.py", "scm_ckpt_to_meanflow": "test_sCM.py",
                "wrong_shapes": "does not fit", "no_prompt": "'prompt'", "bad_resolution": "multiple of 16"}[case]
    assert expected in err[0]
    assert not out.exists()


@pytest.mark.parametrize("flag", [["--num_inference_steps", "0"], ["--seed", "-1"], ["--max_sequence_length", "600"]])
def test_bad_flags_exit_2_before_any_work(setup, tmp_path, flag):
    with pytest.raises(SystemExit) as exc:
        main("scm", _scm_args(setup, tmp_path / "out", *flag))
    assert exc.value.code == 2
    assert not (tmp_path / "out").exists()


def test_script_entry_point_reports_errors_in_one_line(setup, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "test_meanflow.py", "--pretrained_model_name_or_path", setup["pipe"],
                           "--resume_path", setup["scm"], "--output_dir", str(out), *SMALL, "--ds_file", "x.json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "test_sCM.py" in proc.stderr and "Traceback" not in proc.stderr
    assert "--ds_file x.json is ignored" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_geneval_script_with_two_torchrun_processes(setup, tmp_path, monkeypatch):
    """script/geneval_sCM.sh under torchrun with 2 processes writes the same files as one in-process rank."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run_dir = tmp_path / "run"
    (run_dir / "ckpts").mkdir(parents=True)
    os.symlink(setup["scm"], run_dir / "ckpts" / "transformer_5.pt")
    extra = ["--metadata_file", setup["meta"], "--max_sequence_length", "32", "--no_progress", "--n_samples", "2"]
    env = {**os.environ, "MODEL_NAME": setup["pipe"], "RESOLUTION": "64", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "OUTPUT_DIR": str(tmp_path / "two")}
    proc = subprocess.run(["bash", str(REPO / "script" / "geneval_sCM.sh"), str(run_dir), "5", "2", "4.5", *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[rank 0/2]" in proc.stdout and "[rank 1/2]" in proc.stdout
    main("scm", _scm_args(setup, tmp_path / "one", "--n_samples", "2"))
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        if name != "generation_config.json":  # records the (different) checkpoint path
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
