"""Our transformer accepts every call stock FluxTransformer2DModel accepts, with identical outputs at ×1000.

Reference: diffusers' own FluxTransformer2DModel with the same weights (independent of our forward).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from tests.model_factory import TINY, tiny_inputs, tiny_transformer


@pytest.fixture(scope="module")
def pair():
    ours = tiny_transformer()
    stock = FluxTransformer2DModel(**TINY).eval()
    stock.load_state_dict(ours.state_dict())
    x, inputs = tiny_inputs()
    return ours, stock, x, inputs


def _positional(inputs, t):
    return (inputs.encoder_hidden_states, inputs.pooled_projections, t, inputs.img_ids, inputs.txt_ids, inputs.guidance)


@torch.no_grad()
def test_positional_call_equals_stock(pair):
    ours, stock, x, inputs = pair
    t = torch.tensor([0.3, 0.8])
    out = ours(x, *_positional(inputs, t), None, None, None, False)
    ref = stock(x, *_positional(inputs, t), None, None, None, False)
    assert isinstance(out, tuple) and torch.equal(out[0], ref[0])


@torch.no_grad()
def test_return_dict_and_joint_attention_kwargs_equal_stock(pair):
    ours, stock, x, inputs = pair
    t = torch.tensor([0.3, 0.8])
    kw = dict(encoder_hidden_states=inputs.encoder_hidden_states, pooled_projections=inputs.pooled_projections,
              timestep=t, img_ids=inputs.img_ids, txt_ids=inputs.txt_ids, guidance=inputs.guidance,
              joint_attention_kwargs={"scale": 1.0})
    out, ref = ours(x, **kw), stock(x, **kw)
    assert isinstance(out, Transformer2DModelOutput) and torch.equal(out.sample, ref.sample)


@torch.no_grad()
def test_three_dimensional_ids_are_handled_as_stock(pair):
    ours, stock, x, inputs = pair
    t = torch.tensor([0.3, 0.8])
    ids3 = dict(img_ids=inputs.img_ids[None].expand(2, -1, -1), txt_ids=inputs.txt_ids[None].expand(2, -1, -1))
    kw = dict(encoder_hidden_states=inputs.encoder_hidden_states, pooled_projections=inputs.pooled_projections,
              timestep=t, guidance=inputs.guidance, return_dict=False, **ids3)
    two_d = ours(x, *_positional(inputs, t), return_dict=False)[0]
    assert torch.equal(ours(x, **kw)[0], stock(x, **kw)[0])
    assert torch.equal(ours(x, **kw)[0], two_d)


@torch.no_grad()
def test_controlnet_residuals_pass_through_as_stock(pair):
    ours, stock, x, inputs = pair
    t = torch.tensor([0.3, 0.8])
    g = torch.Generator().manual_seed(3)
    inner = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    double = [torch.randn(2, x.shape[1], inner, generator=g) * 0.1]
    single = [torch.randn(2, x.shape[1], inner, generator=g) * 0.1]
    args = (x, *_positional(inputs, t), None, double, single, False)
    out, ref = ours(*args)[0], stock(*args)[0]
    assert torch.equal(out, ref)
    assert not torch.equal(out, ours(x, *_positional(inputs, t), return_dict=False)[0])


def test_missing_timestep_is_a_one_line_error(pair):
    ours, _, x, inputs = pair
    with pytest.raises(ValueError, match="timestep"):
        ours(x, inputs.encoder_hidden_states, inputs.pooled_projections)
