"""Few-step FLUX pipelines (model/pipeline.py) and the diffusers export, on the tiny FLUX pipeline.

References are independent of the code under test: hand-written sCM/MeanFlow recursions with noise
re-drawn from identically seeded generators, the flow → TrigFlow conversion written out here, the
original release's published MeanFlow grid, and diffusers' own FluxPipeline.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from model.loading import CheckpointError, load_flux_transformer
from model.pipeline import (MeanFlowFluxPipeline, SCMFluxPipeline, load_student_transformer, load_teacher_pipeline,
                            meanflow_time_grid)
from training.checkpointing import export_transformer

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]
SIDE = 64  # pixels; tiny VAE factor 8 → 8×8 latent → 16 packed tokens of 64 channels
SEQ = 32  # T5 tokens


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def ckpts(tiny_assets, tmp_path_factory):
    """sCM export (with logvar head), MeanFlow export (interval embedder copied, so h matters), legacy files."""
    pipe_dir, _ = tiny_assets
    root = tmp_path_factory.mktemp("ckpts")
    tf = load_flux_transformer(str(pipe_dir), 1.0)
    scm_state = dict(tf.state_dict())
    scm_state["logvar_linear.weight"] = torch.randn(1, tf.inner_dim)
    scm_state["logvar_linear.bias"] = torch.zeros(1)
    export_transformer(root / "scm" / "transformer_5.pt", scm_state, dict(tf.config), 5)
    torch.save({"module": tf.state_dict()}, root / "transformer_123.pt")  # the original release's format
    tf.enable_interval_embedding("copy")
    export_transformer(root / "mf" / "transformer_7.pt", tf.state_dict(), dict(tf.config), 7)
    return {"pipe": str(pipe_dir), "scm": root / "scm" / "transformer_5.pt", "mf": root / "mf" / "transformer_7.pt",
            "legacy": root / "transformer_123.pt", "root": root}


@pytest.fixture(scope="module")
def scm_pipe(ckpts):
    return SCMFluxPipeline.from_checkpoint(ckpts["pipe"], ckpts["scm"])


@pytest.fixture(scope="module")
def mf_pipe(ckpts):
    return MeanFlowFluxPipeline.from_checkpoint(ckpts["pipe"], ckpts["mf"])


def _unit_noise(pipe, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, (SIDE // 16) ** 2, pipe.transformer.config.in_channels, generator=g)


def _stub_F(calls):
    """A deterministic nonlinear F(x, t) that also depends on the prompt (pooled text) — records its calls."""
    def F(x_scaled, t, inputs):
        calls.append((x_scaled.clone(), t.clone()))
        return torch.tanh(x_scaled) * torch.cos(t)[:, None, None] + 0.1 * inputs.pooled_projections.float().mean(1)[:, None, None]
    return F


# --------------------------------------------------------------------------------------- sCM


def test_scm_one_step_is_the_closed_form_at_pi_over_2(scm_pipe):
    calls = []
    scm_pipe.trigflow_output = _stub_F(calls)
    try:
        eps = _unit_noise(scm_pipe, 2)
        out = scm_pipe(PROMPTS, height=SIDE, width=SIDE, num_inference_steps=1, latents=eps, output_type="latent",
                       max_sequence_length=SEQ).images
    finally:
        del scm_pipe.trigflow_output
    assert len(calls) == 1
    x_scaled, t = calls[0]
    s = torch.tensor(1.5708)  # π/2 as the original (float32)
    assert torch.equal(t, s.expand(2)) and abs(float(s) - math.pi / 2) < 1e-5
    assert torch.allclose(x_scaled, eps)  # x_s/σ_d = ε at the start
    sd = 0.5
    F = _stub_F([])(eps, t, _captured_inputs(scm_pipe, PROMPTS))
    x0 = torch.cos(s) * (sd * eps) - torch.sin(s) * sd * F
    torch.testing.assert_close(out, x0 / sd, rtol=0, atol=1e-6)


def _captured_inputs(pipe, prompts):
    from model.trigflow import FluxInputs

    embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, max_sequence_length=SEQ)
    return FluxInputs(embeds, pooled, text_ids, None)


def test_scm_two_steps_use_intermediate_time_and_fresh_noise(scm_pipe):
    calls = []
    scm_pipe.trigflow_output = _stub_F(calls)
    try:
        out = scm_pipe(PROMPTS, height=SIDE, width=SIDE, num_inference_steps=2, generator=_gens(11, 12),
                       output_type="latent", max_sequence_length=SEQ).images
        alone = scm_pipe(PROMPTS[:1], height=SIDE, width=SIDE, num_inference_steps=2, generator=_gens(11),
                         output_type="latent", max_sequence_length=SEQ).images
    finally:
        del scm_pipe.trigflow_output
    assert [c[1][0].item() for c in calls[:2]] == pytest.approx([1.5708, 1.3])
    # Reference: each image's generator gives its initial noise (drawn unpacked, as FluxPipeline) then ε₁.
    sd, F = 0.5, _stub_F([])
    inputs = _captured_inputs(scm_pipe, PROMPTS)
    eps0, eps1 = [], []
    for seed in (11, 12):
        g = torch.Generator().manual_seed(seed)
        e = torch.randn(1, 16, SIDE // 8, SIDE // 8, generator=g)
        eps0.append(FluxPipeline._pack_latents(e, 1, 16, SIDE // 8, SIDE // 8))
        eps1.append(torch.randn(eps0[-1].shape, generator=g))
    eps0, eps1 = torch.cat(eps0), torch.cat(eps1)
    t0, t1 = torch.tensor(1.5708), torch.tensor(1.3)
    x0_hat = torch.cos(t0) * sd * eps0 - torch.sin(t0) * sd * F(eps0, t0.expand(2), inputs)
    x1 = torch.cos(t1) * x0_hat + torch.sin(t1) * sd * eps1
    torch.testing.assert_close(calls[1][0], x1 / sd, rtol=0, atol=1e-6)
    x0_final = torch.cos(t1) * x1 - torch.sin(t1) * sd * F(x1 / sd, t1.expand(2), inputs)
    torch.testing.assert_close(out, x0_final / sd, rtol=0, atol=1e-6)
    # An image's noise depends only on its own generator, not on its batch.
    torch.testing.assert_close(alone[0], out[0], rtol=0, atol=1e-6)


def test_scm_n_steps_use_the_linear_grid(scm_pipe):
    calls = []
    scm_pipe.trigflow_output = _stub_F(calls)
    try:
        scm_pipe(PROMPTS[:1], height=SIDE, width=SIDE, num_inference_steps=4, generator=_gens(0), output_type="latent",
                 max_sequence_length=SEQ)
    finally:
        del scm_pipe.trigflow_output
    assert [c[1].item() for c in calls] == pytest.approx([1.5708 * (1 - i / 4) for i in range(4)], abs=1e-6)


def test_scm_uses_the_training_trigflow_conversion(scm_pipe):
    """Real student: F = [(1−2s)z + (1−2s+2s²)v(z, s)]/n with s = sin t/(cos t + sin t), z = x·n, n = √(s²+(1−s)²)."""
    eps = _unit_noise(scm_pipe, 2, seed=3)
    out = scm_pipe(PROMPTS, height=SIDE, width=SIDE, num_inference_steps=1, latents=eps, output_type="latent",
                   max_sequence_length=SEQ, guidance_scale=4.5).images
    embeds, pooled, text_ids = scm_pipe.encode_prompt(PROMPTS, None, max_sequence_length=SEQ)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, SIDE // 16, SIDE // 16, "cpu", torch.float32)
    t = torch.tensor(1.5708, dtype=torch.float64)
    s = torch.sin(t) / (torch.cos(t) + torch.sin(t))
    n = torch.sqrt(s ** 2 + (1 - s) ** 2)
    z = eps * n.float()
    v = scm_pipe.transformer(z, timestep=s.float().expand(2), guidance=torch.full((2,), 4.5), encoder_hidden_states=embeds,
                             pooled_projections=pooled, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
    F = (((1 - 2 * s) * z + (1 - 2 * s + 2 * s ** 2) * v) / n).float()
    expected = torch.cos(t).float() * eps - torch.sin(t).float() * F  # (cos t·σ_d ε − sin t·σ_d F)/σ_d
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------- MeanFlow


def test_meanflow_grid_reproduces_the_original_512px_schedule(ckpts):
    config = json.loads((tiny_dir(ckpts) / "scheduler" / "scheduler_config.json").read_text())
    grid = meanflow_time_grid(4, (512 // 16) ** 2, config, "flux")
    np.testing.assert_allclose(grid.numpy(), [1, 0.849, 0.653, 0.385, 0], atol=1e-3)  # upstream-spec numbers
    assert meanflow_time_grid(4, 1024, config, "uniform").tolist() == [1, 0.75, 0.5, 0.25, 0]


def tiny_dir(ckpts):
    from pathlib import Path

    return Path(ckpts["pipe"])


@pytest.mark.parametrize("steps", [1, 3])
def test_meanflow_calls_the_model_once_per_step_with_t_and_t_minus_r(mf_pipe, steps):
    seen = []
    pre = mf_pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(dict(z=kw["hidden_states"].clone() if "hidden_states" in kw else a[0].clone(),
                                          t=kw["timestep"].clone(), h=kw["interval"].clone(), g=kw["guidance"].clone())),
        with_kwargs=True)
    outs = []
    post = mf_pipe.transformer.register_forward_hook(lambda m, a, kw, out: outs.append(out[0].float().clone()), with_kwargs=True)
    try:
        eps = _unit_noise(mf_pipe, 2, seed=5)
        final = mf_pipe(PROMPTS, height=SIDE, width=SIDE, num_inference_steps=steps, latents=eps, guidance_scale=3.5,
                        output_type="latent", max_sequence_length=SEQ).images
    finally:
        pre.remove()
        post.remove()
    assert len(seen) == steps
    # Independent grid: σ = linspace(1, 1/N, N), FLUX shift with μ from the 16-token sequence, then 0.
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)
    sig = np.linspace(1, 1 / steps, steps)
    grid = list(math.exp(mu) / (math.exp(mu) + (1 / sig - 1))) + [0.0]
    z = eps
    for i, call in enumerate(seen):
        t, r = grid[i], grid[i + 1]
        assert call["t"].tolist() == pytest.approx([t, t], abs=1e-6)
        assert call["h"].tolist() == pytest.approx([t - r, t - r], abs=1e-6)
        assert call["g"].tolist() == [3.5, 3.5]
        torch.testing.assert_close(call["z"], z, rtol=0, atol=1e-6)
        z = z - (t - r) * outs[i]  # one jump z_r = z_t − (t − r)·u
    torch.testing.assert_close(final, z, rtol=0, atol=1e-5)


def test_meanflow_interval_changes_the_output(mf_pipe):
    """The copied interval embedder makes u depend on h, so a uniform grid gives other images than FLUX's."""
    kw = dict(height=SIDE, width=SIDE, num_inference_steps=2, output_type="latent", max_sequence_length=SEQ)
    a = mf_pipe(PROMPTS[:1], generator=_gens(1), **kw).images
    b = mf_pipe(PROMPTS[:1], generator=_gens(1), time_schedule="uniform", **kw).images
    assert not torch.allclose(a, b, atol=1e-4)


# --------------------------------------------------------------------------------------- teacher


def test_teacher_pipeline_is_stock_flux_and_gets_unit_interval_times(ckpts):
    stock = FluxPipeline.from_pretrained(ckpts["pipe"])
    ours = load_teacher_pipeline(ckpts["pipe"])
    assert ours.transformer.timestep_scale == 1000.0
    kw = dict(height=SIDE, width=SIDE, num_inference_steps=5, output_type="np", max_sequence_length=SEQ, guidance_scale=3.5)
    seen = []
    ours.transformer.register_forward_pre_hook(lambda m, a, k: seen.append((k["timestep"].clone(), k["guidance"].clone())),
                                               with_kwargs=True)
    a = stock(PROMPTS, generator=_gens(1, 2), **kw).images
    b = ours(PROMPTS, generator=_gens(1, 2), **kw).images
    np.testing.assert_array_equal(a, b)
    # FluxPipeline hands the transformer σ ∈ [0, 1] (its ×1000 timesteps / 1000) and the raw guidance,
    # so a ×1 (rescaled) transformer in the same pipeline sees exactly the inputs it was trained on.
    sigmas = ours.scheduler.sigmas[:-1]
    assert torch.allclose(torch.stack([t[0] for t, _ in seen]), sigmas, atol=1e-6)
    assert all(0 <= float(t.min()) and float(t.max()) <= 1 for t, _ in seen)
    assert all(g.tolist() == [3.5, 3.5] for _, g in seen)


def test_rescaled_teacher_loads_from_checkpoint(ckpts):
    pipe = load_teacher_pipeline(ckpts["pipe"], ckpts["legacy"])  # {'module'} only → timestep_scale 1
    assert pipe.transformer.timestep_scale == 1.0
    with pytest.raises(CheckpointError, match="timestep_scale"):
        load_teacher_pipeline(ckpts["pipe"], timestep_scale=1.0)  # stock weights are not ×1 weights
    with pytest.raises(CheckpointError, match="test_sCM.py"):
        load_teacher_pipeline(ckpts["pipe"], ckpts["scm"])


# --------------------------------------------------------------------------------------- loading


def test_wrong_method_checkpoints_are_refused(ckpts):
    with pytest.raises(CheckpointError, match="test_meanflow.py"):
        SCMFluxPipeline.from_checkpoint(ckpts["pipe"], ckpts["mf"])
    with pytest.raises(CheckpointError, match="test_sCM.py"):
        MeanFlowFluxPipeline.from_checkpoint(ckpts["pipe"], ckpts["scm"])
    with pytest.raises(CheckpointError, match="timestep_scale"):
        SCMFluxPipeline.from_checkpoint(ckpts["pipe"], ckpts["scm"], timestep_scale=1000.0)


def test_wrong_shapes_are_refused(ckpts, tmp_path):
    from tests.model_factory import tiny_transformer

    other = tiny_transformer()  # another FLUX size, saved without config: the tiny pipeline's config is used
    torch.save({"module": other.state_dict()}, tmp_path / "transformer_1.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        SCMFluxPipeline.from_checkpoint(ckpts["pipe"], tmp_path / "transformer_1.pt")


def test_legacy_checkpoint_equals_export_of_the_same_weights(ckpts, scm_pipe):
    legacy = SCMFluxPipeline.from_checkpoint(ckpts["pipe"], ckpts["legacy"])
    assert legacy.checkpoint_step == 123 and scm_pipe.checkpoint_step == 5  # step from the file name / from the file
    assert legacy.transformer.timestep_scale == 1.0
    kw = dict(height=SIDE, width=SIDE, output_type="np", max_sequence_length=SEQ)
    np.testing.assert_array_equal(legacy(PROMPTS, generator=_gens(4, 5), **kw).images,
                                  scm_pipe(PROMPTS, generator=_gens(4, 5), **kw).images)


def test_student_is_loaded_in_the_requested_dtype(ckpts):
    tf, ckpt = load_student_transformer(ckpts["mf"], method="meanflow", dtype=torch.bfloat16)
    assert {p.dtype for p in tf.parameters()} == {torch.bfloat16}
    ref = ckpt.state_dict
    assert all(torch.equal(v, ref[k].to(torch.bfloat16)) for k, v in tf.state_dict().items())


@pytest.mark.parametrize("bad", [dict(num_inference_steps=0), dict(height=40, width=40)])
def test_bad_call_arguments(scm_pipe, bad):
    kw = {**dict(height=SIDE, width=SIDE, max_sequence_length=SEQ, output_type="latent"), **bad}
    with pytest.raises(ValueError):
        scm_pipe(PROMPTS[:1], **kw)


# --------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_export_reloads_with_identical_images(ckpts, tmp_path, method):
    from export_diffusers import main as export_main

    cls = {"scm": SCMFluxPipeline, "meanflow": MeanFlowFluxPipeline}[method]
    ckpt = ckpts["scm" if method == "scm" else "mf"]
    out = tmp_path / "export"
    export_main(["--method", method, "--checkpoint", str(ckpt), "--pretrained_model_name_or_path", ckpts["pipe"],
                 "--output_dir", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", cls.__name__]  # remote code for plain diffusers (tests/test_compat_export.py)
    assert index["transformer"] == ["transformer", "DistillFluxTransformer2DModel"]
    reloaded = cls.from_pretrained(str(out))
    direct = cls.from_checkpoint(ckpts["pipe"], ckpt)
    assert type(reloaded.scheduler) is type(direct.scheduler)
    kw = dict(height=SIDE, width=SIDE, output_type="np", max_sequence_length=SEQ)
    np.testing.assert_array_equal(reloaded(PROMPTS, generator=_gens(7, 8), **kw).images,
                                  direct(PROMPTS, generator=_gens(7, 8), **kw).images)
    # diffusers' own save_pretrained of our pipeline also writes a loadable folder.
    reloaded.save_pretrained(tmp_path / "resaved")
    again = cls.from_pretrained(str(tmp_path / "resaved"))
    np.testing.assert_array_equal(again(PROMPTS, generator=_gens(7, 8), **kw).images,
                                  direct(PROMPTS, generator=_gens(7, 8), **kw).images)
    # An existing folder is not overwritten without --overwrite; a wrong-method checkpoint writes nothing.
    with pytest.raises(ValueError, match="exists"):
        export_main(["--method", method, "--checkpoint", str(ckpt), "--pretrained_model_name_or_path", ckpts["pipe"],
                     "--output_dir", str(out)])
    other = "meanflow" if method == "scm" else "scm"
    with pytest.raises(CheckpointError):
        export_main(["--method", other, "--checkpoint", str(ckpt), "--pretrained_model_name_or_path", ckpts["pipe"],
                     "--output_dir", str(tmp_path / "nope")])
    assert not (tmp_path / "nope").exists()
