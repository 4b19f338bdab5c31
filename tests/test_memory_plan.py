"""training.memory_plan against the real models: parameter counts, saved activations, measured peaks."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.transformer import DistillFluxTransformer2DModel
from model.trigflow import FluxInputs, flow_velocity
from tests.model_factory import TINY
from training.memory_plan import FLUX_LITE_8B, GIB, RunShape, count_parameters, main, plan_memory, trace_bytes

MEDIUM = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
              joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 28, 28))


def test_parameter_count_equals_the_built_model():
    for config in (TINY, MEDIUM):
        model = DistillFluxTransformer2DModel(**config)
        assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert 8.0e9 < count_parameters(FLUX_LITE_8B) < 8.3e9  # "8B"


def _saved_bytes_of_a_grad_forward(config: dict, side: int, text: int, batch: int) -> int:
    """Independent reference: bytes of every non-parameter tensor autograd saves in one forward."""
    torch.manual_seed(0)
    model = DistillFluxTransformer2DModel(**config, timestep_scale=1.0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    inputs = FluxInputs(torch.randn(batch, text, config["joint_attention_dim"]),
                        torch.randn(batch, config["pooled_projection_dim"]), torch.zeros(text, 3), ids.reshape(-1, 3),
                        torch.full((batch,), 4.5))
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flow_velocity(model, torch.randn(batch, side * side, config["in_channels"]), torch.full((batch,), 0.5), inputs)
    return sum(storages.values())


def test_activation_term_extrapolates_from_the_probe_to_a_bigger_model():
    """The plan probes 2 heads, 1 + 1 blocks and ≤ 272 tokens; the real medium model has 4 heads, 2 + 4 blocks
    and 576 + 32 tokens.  Its saved activations, measured directly, must match the plan's row."""
    shape = RunShape(dict(MEDIUM), resolution=24 * 16, batch=2, num_gpus=1, zero_stage=0, precision="fp32",
                     method="rescale", conditioning_cache=True, max_sequence_length=32, bucket_elements=0)
    planned = plan_memory(shape).rows["(activations, gradient pass)"]
    measured = _saved_bytes_of_a_grad_forward(MEDIUM, side=24, text=32, batch=2)
    assert abs(planned / measured - 1) < 0.10, (planned, measured)


def test_sharding_caching_and_lora_terms():
    traced = trace_bytes(RunShape())
    base = plan_memory(RunShape(num_gpus=1, zero_stage=2), traced)
    eight = plan_memory(RunShape(num_gpus=8, zero_stage=2), traced)
    assert eight.rows["gradients"] == pytest.approx(base.rows["gradients"] / 8)
    assert eight.rows["student weights"] == base.rows["student weights"]  # ZeRO-2 keeps full bf16 weights
    cached = plan_memory(RunShape(conditioning_cache=True), traced)
    assert cached.rows["text encoders + VAE"] == 0 and eight.rows["text encoders + VAE"] > 9 * GIB
    lora = plan_memory(RunShape(trainable_params=10 ** 7, teacher_shares_weights=True), traced)
    assert lora.rows["teacher weights"] == 0
    assert lora.rows["optimizer (Adam m, v, fp32 master)"] == pytest.approx(12 * 10 ** 7 / 8)
    ckpt = plan_memory(RunShape(gradient_checkpointing=True, resolution=1024), traced)
    full = plan_memory(RunShape(resolution=1024), traced)
    assert ckpt.rows["(activations, gradient pass)"] < full.rows["(activations, gradient pass)"] / 5
    with pytest.raises(ValueError, match="ZeRO-3"):
        plan_memory(replace(RunShape(), zero_stage=3), traced)


def test_cli_prints_the_8b_table(capsys):
    assert main(["--resolution", "512", "--num_gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "8.16 B parameters" in out and "| **total** |" in out and "fits 80 GiB" in out
    assert main(["--zero_stage", "3"]) == 2
    assert "ZeRO-3" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sCM", "MeanFlow+CFG"])
def test_plan_matches_measured_peak_on_cpu(method):
    """The benchmark's measured peak (loss + backward + AdamW step, fresh process) within 15 % of the plan."""
    import argparse

    from benchmarks.train_step import CONFIGS, _child, planned_peak_bytes

    args = argparse.Namespace(device="cpu", dtype="fp32", rounds=1, threads=1, clock="process")
    row = _child(method, "medium-256", args)
    planned = planned_peak_bytes(CONFIGS["medium-256"], method, "fp32")
    assert abs(planned / row["peak_bytes"] - 1) < 0.15, (planned, row["peak_bytes"])
