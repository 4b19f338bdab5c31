"""LoRA students tied to their teacher (model/lora.py, training/lora.py).

References: an independent deep copy of the base model taken before the adapter was added (teacher
equality, base weights unchanged), W + (α/r)·B·A written out here (fused weights), central finite
differences (JVP), and diffusers' own ``FluxPipeline.load_lora_weights`` (reload).
"""
from __future__ import annotations

import argparse
import copy

import pytest
import torch
from diffusers import FluxPipeline

from model.attention import set_jvp_attention
from model.lora import (LoraError, LoraSpec, add_student_adapter, apply_lora_folder, count_parameters,
                        fused_state_dict, head_parameters, read_lora_folder, resolve_target_modules, save_lora_folder,
                        teacher_mode)
from model.trigflow import flow_velocity
from tests.model_factory import tiny_inputs, tiny_transformer
from training.lora import build_tied_models
from training.meanflow import MeanFlowLoss, MeanFlowLossConfig, MeanFlowMethod
from training.rescale import RescaleLoss, RescaleLossConfig, RescaleMethod
from training.scm import SCMLoss, SCMLossConfig, SCMMethod

SPEC = LoraSpec(rank=4, alpha=8)


def _perturb_lora(transformer, seed=0):
    """B = 0 at initialisation makes the student equal its base; random B makes every check meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _args(**kw):
    return argparse.Namespace(**kw)


def _methods():
    scm = SCMMethod(SCMLoss(SCMLossConfig()), "chunked")
    mf = MeanFlowMethod(MeanFlowLoss(MeanFlowLossConfig()), None, "copy", "chunked")
    rescale = RescaleMethod(RescaleLoss(RescaleLossConfig()))
    return {"scm": scm, "meanflow": mf, "rescale": rescale}


def test_target_modules_resolve_inside_the_blocks_only():
    tf = tiny_transformer()
    names = resolve_target_modules(tf, ("proj_out", "to_q"))
    assert "proj_out" not in names  # the final output layer is not a block layer
    assert "single_transformer_blocks.0.proj_out" in names and "transformer_blocks.0.attn.to_q" in names
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in resolve_target_modules(tf, ("all",)))
    with pytest.raises(LoraError, match="to_qq match no Linear"):
        resolve_target_modules(tf, ("to_qq",))
    with pytest.raises(LoraError, match="lora_rank"):
        LoraSpec(rank=0)


@pytest.mark.parametrize("name", ["scm", "meanflow", "rescale"])
def test_teacher_is_the_base_model_and_no_second_copy_exists(name):
    """Teacher output (adapters off) equals an independent copy of the base; the teacher owns no weights."""
    base = tiny_transformer(timestep_scale=1000.0 if name == "rescale" else 1.0)
    reference = copy.deepcopy(base)
    latents, inputs = tiny_inputs()
    t = torch.tensor([0.3, 0.9])
    student, teacher = build_tied_models(_args(), _methods()[name], base, SPEC, torch.float32)
    _perturb_lora(base)
    storages = {p.data_ptr() for p in base.parameters()}
    assert list(teacher.parameters()) == []  # nothing to cast or freeze: the student's weights are safe
    assert {p.data_ptr() for p in student.parameters()} <= storages | {
        p.data_ptr() for p in getattr(student, "logvar_linear", torch.nn.Linear(1, 1)).parameters()}
    assert teacher.transformer is base  # one transformer in memory
    if name == "scm":
        ref_out = _methods()["scm"].build_models(_args(), copy.deepcopy(reference), copy.deepcopy(reference))[1](latents, t, inputs)
        out = teacher(latents, t, inputs)
        student_out = student(latents, t, inputs)
    elif name == "meanflow":
        ref_out = flow_velocity(reference, latents, t, inputs)
        out = teacher(latents, t, inputs)
        student_out = student(latents, t * 0.5, t, inputs)
    else:  # rescale: the teacher is the stock (×1000) base, called as the RescaleLoss calls it
        ref_out = flow_velocity(reference, latents, t, inputs)
        out = flow_velocity(teacher, latents, t, inputs)
        student_out = flow_velocity(student, latents, t, inputs)
    assert torch.equal(out, ref_out)
    assert (student_out - ref_out).abs().max() > 1e-3  # the student differs: adapters (and ×1 time) are on again
    # Nothing else was left switched off or changed.
    assert base.time_text_embed.interval_enabled and base.time_text_embed.timestep_scale == base.timestep_scale


def test_only_lora_and_head_parameters_train_and_base_weights_stay():
    base = tiny_transformer(timestep_scale=1.0)
    student, teacher = build_tied_models(_args(), _methods()["meanflow"], base, SPEC, torch.float32)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("transformer.time_text_embed.interval_embedder.")
                             for n in trainable)
    assert any("interval_embedder" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    loss_fn = MeanFlowLoss(MeanFlowLossConfig(cfg_prob=0.0))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    latents, inputs = tiny_inputs()
    before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    for _ in range(3):
        out = loss_fn(student, student, teacher, latents, inputs, None)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters() if n in before)
    assert {n for n, p in student.named_parameters() if p.requires_grad} == trainable  # teacher calls restore grads


def test_scm_logvar_head_trains_in_full():
    base = tiny_transformer(timestep_scale=1.0)
    student, _ = build_tied_models(_args(), _methods()["scm"], base, SPEC, torch.float32)
    names = {n for n, p in student.named_parameters() if p.requires_grad and ".lora_" not in n}
    assert names == {"logvar_linear.weight", "logvar_linear.bias"}


@pytest.mark.parametrize("impl", ["chunked", "math"])
def test_jvp_through_lora_layers_and_the_jvp_attention(impl):
    """torch.func.jvp of the LoRA student (JVP attention processor) against central differences along x."""
    base = tiny_transformer(timestep_scale=1.0, dtype=torch.float64)
    add_student_adapter(base, SPEC)
    _perturb_lora(base)
    base.double()
    set_jvp_attention(base, impl)
    latents, inputs = tiny_inputs(dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    direction = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f = lambda z: base(z, timestep=t, **inputs.kwargs(torch.float64))[0]
    with torch.no_grad():
        out, jvp = torch.func.jvp(f, (latents,), (direction,))
        eps = 1e-4
        fd = (f(latents + eps * direction) - f(latents - eps * direction)) / (2 * eps)
    assert ((jvp - fd).norm() / fd.norm()) < 1e-4  # fp64 model with fp32 islands (RoPE): FD-limited
    # Dot-product test against reverse mode (the processor's backward is a separate code path): <u, Jv> = <J^T u, v>.
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, vjp_fn = torch.func.vjp(f, latents)
    (jt_u,) = vjp_fn(u)
    lhs, rhs = (u * jvp).sum(), (jt_u * direction).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-8
    lora_only = {n for n, p in base.named_parameters() if p.requires_grad}
    assert lora_only and all(".lora_" in n for n in lora_only)


def test_fused_weights_are_w_plus_scaled_ba():
    base = tiny_transformer(timestep_scale=1.0)
    reference = copy.deepcopy(base)
    add_student_adapter(base, SPEC)
    _perturb_lora(base)
    fused = fused_state_dict(base)
    assert set(fused) == set(reference.state_dict())
    layer = base.transformer_blocks[0].attn.to_q
    a, b = layer.lora_A["student"].weight, layer.lora_B["student"].weight
    expected = reference.transformer_blocks[0].attn.to_q.weight + (SPEC.lora_alpha / SPEC.rank) * b @ a
    torch.testing.assert_close(fused["transformer_blocks.0.attn.to_q.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(fused["x_embedder.weight"], reference.x_embedder.weight)


def test_saved_adapter_reloads_into_diffusers_pipeline_with_identical_outputs(tiny_assets, tmp_path):
    """LoRA folder → stock FluxPipeline.load_lora_weights and our apply_lora_folder (adapter and fused)."""
    from model.loading import load_flux_transformer

    pipe_dir, _ = tiny_assets
    base = load_flux_transformer(str(pipe_dir), 1.0)
    student, _ = build_tied_models(_args(), _methods()["meanflow"], base, SPEC, torch.float32)
    _perturb_lora(base)
    with torch.no_grad():
        for p in head_parameters(base).values():
            p.add_(0.05)
    folder = save_lora_folder(tmp_path / "lora_3", base, head_parameters(base), {"method": "MeanFlow", "step": 3})
    latents = torch.randn(2, 16, base.config.in_channels, generator=torch.Generator().manual_seed(0))
    inputs = _pipe_inputs(base)
    t = torch.tensor([0.4, 0.8])
    with torch.no_grad():
        expected = student(latents, t * 0.5, t, inputs)

    pipe = FluxPipeline.from_pretrained(str(pipe_dir), transformer=load_flux_transformer(str(pipe_dir), 1.0))
    pipe.transformer.enable_interval_embedding("zero")
    pipe.transformer.time_text_embed.interval_embedder.load_state_dict(
        {k.split("interval_embedder.")[1]: v for k, v in read_lora_folder(folder).heads.items()})
    pipe.load_lora_weights(str(folder))  # diffusers' own loader, from the folder
    with torch.no_grad():
        got = flow_velocity(pipe.transformer, latents, t, inputs, interval=t - t * 0.5)
    assert torch.equal(got, expected)

    for fuse in (False, True):
        fresh = load_flux_transformer(str(pipe_dir), 1.0)
        apply_lora_folder(fresh, read_lora_folder(folder), fuse=fuse)
        with torch.no_grad():
            got = flow_velocity(fresh, latents, t, inputs, interval=t - t * 0.5)
        if fuse:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # W + ΔW rounds once
            assert not any(".lora_" in k for k in fresh.state_dict())
        else:
            assert torch.equal(got, expected)


def _pipe_inputs(transformer):
    from model.trigflow import FluxInputs

    g = torch.Generator().manual_seed(1)
    cfg = transformer.config
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    return FluxInputs(torch.randn(2, 7, cfg.joint_attention_dim, generator=g),
                      torch.randn(2, cfg.pooled_projection_dim, generator=g), torch.zeros(7, 3), ids.reshape(-1, 3),
                      torch.full((2,), 3.5) if cfg.guidance_embeds else None)


def test_teacher_mode_restores_state_after_an_error():
    base = tiny_transformer(timestep_scale=1.0)
    add_student_adapter(base, SPEC)
    base.enable_interval_embedding("copy")
    with pytest.raises(RuntimeError):
        with teacher_mode(base, 1000.0):
            assert base.time_text_embed.timestep_scale == 1000.0
            raise RuntimeError("boom")
    assert base.time_text_embed.timestep_scale == 1.0 and base.time_text_embed.interval_enabled
    assert all(p.requires_grad for n, p in base.named_parameters() if ".lora_" in n)


def test_parameter_counts():
    base = tiny_transformer(timestep_scale=1.0)
    full = count_parameters(base)["total"]
    add_student_adapter(base, SPEC)
    counts = count_parameters(base)
    per_layer = sum(SPEC.rank * (m.in_features + m.out_features) for n, m in base.named_modules()
                    if n in set(resolve_target_modules(tiny_transformer(), SPEC.target_modules)))
    assert counts == {"total": full + counts["trainable"], "trainable": per_layer}


# ---------------------------------------------------------------------------------------------------------
# Exports → pipelines, export_diffusers.py and the sampling CLI
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_exports(tiny_assets, tmp_path_factory):
    """A rescaled (×1) base .pt, and LoRA exports of sCM/MeanFlow students trained on it (random B, heads)."""
    from model.loading import load_flux_transformer
    from training.checkpointing import export_transformer
    from training.lora import export_lora_student

    pipe_dir, _ = tiny_assets
    root = tmp_path_factory.mktemp("lora_exports")
    base = load_flux_transformer(str(pipe_dir), 1.0)
    with torch.no_grad():  # a base that differs from the pipeline's own transformer
        base.x_embedder.weight.mul_(1.1)
    export_transformer(root / "rescaled.pt", base.state_dict(), dict(base.config), 0)
    out = {"pipe": str(pipe_dir), "base": root / "rescaled.pt"}
    for name in ("scm", "meanflow"):
        transformer = load_flux_transformer(str(pipe_dir), 1.0)
        transformer.load_state_dict(base.state_dict())
        student, _ = build_tied_models(_args(), _methods()[name], transformer, SPEC, torch.float32)
        _perturb_lora(transformer, seed=len(name))
        args = _args(pretrained_model_name_or_path=str(pipe_dir), rescaled_checkpoint_path=str(root / "rescaled.pt"),
                     lora_rank=SPEC.rank, lora_alpha=SPEC.alpha, lora_target_modules="all", lora_dropout=0.0)
        out[name] = export_lora_student(root / name, _methods()[name], student, args, step=11)
        out[name + "_fused"] = root / f"{name}_fused.pt"
        export_transformer(out[name + "_fused"], fused_state_dict(transformer), dict(transformer.config), 11)
    return out


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_lora_export_samples_like_the_fused_student_and_exports_to_diffusers(lora_exports, tmp_path, method):
    """The LoRA folder loads into our pipeline (applied to its recorded base) and samples like the fused
    weights; export_diffusers.py writes an adapter folder (identical images) and a --fuse_lora folder."""
    import numpy as np

    from export_diffusers import main as export_main
    from model.pipeline import MeanFlowFluxPipeline, SCMFluxPipeline

    cls = {"scm": SCMFluxPipeline, "meanflow": MeanFlowFluxPipeline}[method]
    kw = dict(height=64, width=64, output_type="np", max_sequence_length=32)
    prompts = ["a red circle", "two blue squares"]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]
    lora = cls.from_checkpoint(lora_exports["pipe"], lora_exports[method])
    assert lora.checkpoint_step == 11
    fused = cls.from_checkpoint(lora_exports["pipe"], lora_exports[method + "_fused"])
    images = lora(prompts, generator=gens(), **kw).images
    np.testing.assert_allclose(images, fused(prompts, generator=gens(), **kw).images, atol=2e-5)

    adapter_dir, fused_dir = tmp_path / "adapter", tmp_path / "fused"
    common = ["--method", method, "--checkpoint", str(lora_exports[method]), "--pretrained_model_name_or_path",
              lora_exports["pipe"]]
    export_main(common + ["--output_dir", str(adapter_dir)])
    export_main(common + ["--output_dir", str(fused_dir), "--fuse_lora"])
    assert (adapter_dir / "pytorch_lora_weights.safetensors").is_file()
    assert not (fused_dir / "pytorch_lora_weights.safetensors").exists()
    np.testing.assert_array_equal(cls.from_pretrained(str(adapter_dir))(prompts, generator=gens(), **kw).images, images)
    from diffusers import DiffusionPipeline  # plain diffusers, running the folder's shipped code

    plain = DiffusionPipeline.from_pretrained(str(adapter_dir), trust_remote_code=True)
    np.testing.assert_array_equal(plain(prompts, generator=gens(), **kw).images, images)
    np.testing.assert_allclose(cls.from_pretrained(str(fused_dir))(prompts, generator=gens(), **kw).images, images,
                               atol=2e-5)


def test_sampling_cli_reads_a_lora_folder_and_names_a_missing_base(lora_exports, tmp_path):
    from model.sampling_cli import main as sample_main

    common = ["--pretrained_model_name_or_path", lora_exports["pipe"], "--resume_path", str(lora_exports["meanflow"]),
              "--prompt", "a red circle", "--n_samples", "1", "--resolution", "64", "--max_sequence_length", "32",
              "--no_progress"]
    report = sample_main("meanflow", common + ["--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "00000" / "samples" / "0000.png").is_file() and report is not None
    with pytest.raises(LoraError, match="--lora_base"):
        sample_main("meanflow", common + ["--output_dir", str(tmp_path / "o2"), "--lora_base", str(tmp_path / "gone.pt")])
    from model.loading import CheckpointError

    with pytest.raises(CheckpointError, match="MeanFlow student"):
        sample_main("scm", common + ["--output_dir", str(tmp_path / "o3")])  # a MeanFlow adapter, sCM sampler


@pytest.mark.parametrize("name,plan_method", [("scm", "sCM"), ("meanflow", "MeanFlow")])
def test_memory_plan_counts_the_trainable_tensors_of_a_built_lora_student(name, plan_method):
    """python -m training.memory_plan --lora_rank: its count equals the trainable tensors the trainer builds."""
    from tests.model_factory import TINY
    from training.memory_plan import lora_trainable_params, main as plan_main

    student, _ = build_tied_models(_args(), _methods()[name], tiny_transformer(timestep_scale=1.0), SPEC, torch.float32)
    built = sum(p.numel() for p in student.parameters() if p.requires_grad)
    planned = lora_trainable_params(dict(TINY), plan_method, SPEC.rank, ",".join(SPEC.target_modules))
    assert planned == built
    assert plan_main(["--lora_rank", "4", "--lora_target_modules", "to_qq"]) == 2  # bad target: one-line error


@pytest.mark.parametrize("flags,message", [
    (["--lora_rank", "-1"], "--lora_rank -1 must be >= 0"),
    (["--lora_alpha", "8"], "add --lora_rank"),
    (["--lora_rank", "4", "--lora_dropout", "1.5"], "--lora_dropout 1.5 must be in"),
    (["--streaming_shuffle_buffer", "10"], "only applies with --streaming"),
    (["--max_train_samples", "0"], "--max_train_samples 0 must be >= 1"),
])
def test_bad_lora_and_streaming_flags_are_refused_by_the_parser(tmp_path, flags, message):
    from train_sCM import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path / "o"), "--timestep_scale",
                    "1000", *flags])
    assert not (tmp_path / "o").exists()
