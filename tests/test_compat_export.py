"""Exported folders (export_diffusers.py) load back, in this repository and in plain diffusers (issue #19).

References: the pipelines built directly from the training checkpoints (``from_checkpoint`` /
``load_teacher_pipeline(pipe, ckpt)``), the sampling CLIs' PNGs, and a Python process that cannot
import this repository.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.generate import image_seed
from model.loading import load_flux_transformer
from model.pipeline import MeanFlowFluxPipeline, SCMFluxPipeline, load_teacher_pipeline
from model.sampling_cli import main as cli_main
from training.checkpointing import export_transformer

REPO = Path(__file__).resolve().parents[1]
KW = dict(height=64, width=64, max_sequence_length=32)
# (CLI method, checkpoint key, pipeline call) per exported kind; steps/guidance passed explicitly everywhere.
KINDS = {"scm": ("scm", dict(num_inference_steps=2, guidance_scale=4.5)),
         "meanflow": ("meanflow", dict(num_inference_steps=2, guidance_scale=3.5)),
         "teacher": ("teacher", dict(num_inference_steps=2, guidance_scale=3.5))}
PROMPT = "a photo of a red circle"
SEED = 42


@pytest.fixture(scope="module")
def exported(tiny_assets, tmp_path_factory):
    from export_diffusers import main as export_main

    pipe_dir, _ = tiny_assets
    root = tmp_path_factory.mktemp("compat_export")
    tf = load_flux_transformer(str(pipe_dir), 1.0)  # a ×1 model: the case a stock class would get wrong
    ckpts = {"teacher": root / "rescaled.pt", "scm": root / "scm.pt", "meanflow": root / "mf.pt"}
    export_transformer(ckpts["teacher"], tf.state_dict(), dict(tf.config), 3)
    state = dict(tf.state_dict())
    state["logvar_linear.weight"], state["logvar_linear.bias"] = torch.randn(1, tf.inner_dim), torch.zeros(1)
    export_transformer(ckpts["scm"], state, dict(tf.config), 5)
    tf.enable_interval_embedding("copy")
    export_transformer(ckpts["meanflow"], tf.state_dict(), dict(tf.config), 7)
    folders = {}
    for kind in KINDS:
        folders[kind] = root / f"export-{kind}"
        export_main(["--method", kind, "--checkpoint", str(ckpts[kind]), "--pretrained_model_name_or_path",
                     str(pipe_dir), "--output_dir", str(folders[kind])])
    return {"pipe": str(pipe_dir), "ckpts": ckpts, "folders": folders, "root": root}


def _images(pipe, kind):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), output_type="np", **KW, **KINDS[kind][1]).images


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_round_trip_gives_the_checkpoints_images(exported, kind):
    folder, ckpt = exported["folders"][kind], exported["ckpts"][kind]
    if kind == "teacher":
        reloaded = load_teacher_pipeline(str(folder))
        direct = load_teacher_pipeline(exported["pipe"], ckpt)
    else:
        cls = {"scm": SCMFluxPipeline, "meanflow": MeanFlowFluxPipeline}[kind]
        reloaded, direct = cls.from_pretrained(str(folder)), cls.from_checkpoint(exported["pipe"], ckpt)
        assert type(reloaded) is cls  # this repository's class, not the folder's shipped copy
    assert type(reloaded.transformer) is type(direct.transformer)
    assert reloaded.transformer.config.timestep_scale == 1.0
    assert reloaded.transformer.config.interval_embedding == (kind == "meanflow")
    # Same weights bit for bit; the images agree to float32 rounding only, because from_pretrained's weights are
    # memory-mapped safetensors views, for which CPU BLAS takes other code paths (cloning them gives equality).
    assert all(torch.equal(v, direct.transformer.state_dict()[k]) for k, v in reloaded.transformer.state_dict().items())
    np.testing.assert_allclose(_images(reloaded, kind), _images(direct, kind), rtol=0, atol=1e-5)


def test_x1_student_through_the_stock_class_is_flagged(exported, caplog):
    """No layout makes stock FluxTransformer2DModel refuse a ×1 folder (README says so beside the loading
    lines); what it does do is name the ignored ``timestep_scale`` in a warning — keep it that way."""
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            FluxTransformer2DModel.from_pretrained(exported["folders"]["scm"] / "transformer")
    finally:
        diffusers_logging.disable_propagation()
    assert any("timestep_scale" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    readme = (REPO / "README.md").read_text()
    assert "trust_remote_code=True" in readme and "FluxTransformer2DModel.from_pretrained" in readme


_PLAIN = r"""
import json, sys, numpy as np, torch
repo, spec = sys.argv[1], json.loads(sys.argv[2])
assert repo not in sys.path
try:
    import model  # noqa: F401
    raise SystemExit("this repository is importable")
except ImportError:
    pass
from diffusers import DiffusionPipeline
for kind, item in spec.items():
    pipe = DiffusionPipeline.from_pretrained(item["folder"], trust_remote_code=True)
    assert type(pipe).__name__ == item["class"], type(pipe)
    assert type(pipe.transformer).__module__.startswith("diffusers_modules"), type(pipe.transformer)
    image = pipe(item["prompt"], generator=torch.Generator("cpu").manual_seed(item["seed"]), **item["call"]).images[0]
    image.save(item["out"])
"""


@pytest.mark.parametrize("kind", ["scm", pytest.param("meanflow", marks=pytest.mark.slow),
                                  pytest.param("teacher", marks=pytest.mark.slow)])
def test_plain_diffusers_load_gives_the_cli_pixels(exported, tmp_path, kind):
    method, call = KINDS[kind]
    folder = exported["folders"][kind]
    out = tmp_path / "cli"
    model_args = ["--pretrained_model_name_or_path", str(folder)] if kind == "teacher" else ["--resume_path", str(folder)]
    cli_main(method, [*model_args, "--output_dir", str(out), "--prompt", PROMPT, "--n_samples", "1", "--seed", str(SEED),
                      "--resolution", "64", "--max_sequence_length", "32", "--no_progress",
                      "--num_inference_steps", str(call["num_inference_steps"]), "--guidance_scale", str(call["guidance_scale"])])
    index = json.loads((folder / "model_index.json").read_text())
    spec = {kind: dict(folder=str(folder), prompt=PROMPT, seed=image_seed(SEED, 0, 0), out=str(tmp_path / "plain.png"),
                       call=dict(KW, **call),
                       **{"class": index["_class_name"] if kind == "teacher" else index["_class_name"][1]})}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-I", "-c", _PLAIN, str(REPO), json.dumps(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "plain.png")),
                                  np.asarray(Image.open(out / "00000" / "samples" / "0000.png")))
