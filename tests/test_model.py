"""The FLUX subclass, JVP-safe attention and TrigFlow wrapper against independent references."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch.autograd import forward_ad

from model.attention import _AttentionWithJVP, jvp_safe_attention, set_jvp_attention
from model.transformer import DistillFluxTransformer2DModel
from model.trigflow import FluxInputs, TrigFlowFlux
from model_factory import TINY, tiny_inputs, tiny_transformer


def _call(model, x, t, inputs: FluxInputs, **extra):
    dtype = next(model.parameters()).dtype
    return model(x.to(dtype), timestep=t, **inputs.kwargs(dtype), **extra)[0]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_stock_scale_reproduces_diffusers_bitwise():
    ours = tiny_transformer()
    stock = FluxTransformer2DModel(**TINY).eval()
    stock.load_state_dict(ours.state_dict())
    x, inputs = tiny_inputs()
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(_call(ours, x, t, inputs), _call(stock, x, t, inputs))


def test_unit_scale_embeds_t_not_1000t():
    x1 = tiny_transformer(timestep_scale=1.0)
    stock = tiny_transformer()  # same seed → same weights
    x, inputs = tiny_inputs()
    t = torch.tensor([0.3, 0.8])
    scaled = FluxInputs(inputs.encoder_hidden_states, inputs.pooled_projections, inputs.txt_ids, inputs.img_ids,
                        inputs.guidance * 1000)
    with torch.no_grad():
        # ×1 model fed 1000·t (and 1000·guidance) == stock model fed t.
        torch.testing.assert_close(_call(x1, x, t * 1000, scaled), _call(stock, x, t, inputs), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(_call(x1, x, t, inputs), _call(stock, x, t, inputs))


@pytest.mark.parametrize("impl", ["chunked", "math"])
def test_jvp_matches_central_differences_float64(impl):
    model = tiny_transformer(timestep_scale=1.0, dtype=torch.float64)
    set_jvp_attention(model, impl)
    x, inputs = tiny_inputs(dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    f = lambda xx, tt: _call(model, xx, tt, inputs)
    # RoPE runs in float32 even in a float64 model, so differences carry ~1e-7·‖f‖ of noise: the step
    # along t (whose tangent is ~50x smaller than f) must be larger; truncation is O(eps²) either way.
    eps_x, eps_t = 1e-4, 1e-2
    with torch.no_grad():
        _, jvp_x = torch.func.jvp(f, (x, t), (dx, torch.zeros_like(t)))
        _, jvp_t = torch.func.jvp(f, (x, t), (torch.zeros_like(x), torch.ones_like(t)))
        fd_x = (f(x + eps_x * dx, t) - f(x - eps_x * dx, t)) / (2 * eps_x)
        fd_t = (f(x, t + eps_t) - f(x, t - eps_t)) / (2 * eps_t)
    assert _rel(jvp_x, fd_x) <= 1e-4
    assert _rel(jvp_t, fd_t) <= 1e-4


def test_stock_sdpa_has_no_forward_ad_but_our_processor_does():
    model = tiny_transformer(timestep_scale=1.0)
    x, inputs = tiny_inputs()
    t = torch.tensor([0.3, 0.7])
    f = lambda xx: _call(model, xx, t, inputs)
    with torch.no_grad(), pytest.raises(Exception, match="forward AD|forward-mode|not implemented"):
        torch.func.jvp(f, (x,), (torch.ones_like(x),))
    set_jvp_attention(model)
    with torch.no_grad():
        out, _ = torch.func.jvp(f, (x,), (torch.ones_like(x),))
        torch.testing.assert_close(out, f(x))  # primal through the JVP path == ordinary forward


def test_chunked_attention_tangent_equals_math_and_forward_ad(monkeypatch):
    monkeypatch.setattr(_AttentionWithJVP, "chunk_size", 3)  # several chunks, one ragged
    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(2, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(6))
    ref_out, ref_tan = torch.func.jvp(lambda a, b, c: jvp_safe_attention(a, b, c, "math"), (q, k, v), (dq, dk, dv))
    out, tan = torch.func.jvp(lambda a, b, c: jvp_safe_attention(a, b, c, "chunked"), (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tan, ref_tan)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(a, b) for a, b in ((q, dq), (k, dk), (v, dv))]
        fw_tan = forward_ad.unpack_dual(jvp_safe_attention(*duals, "chunked")).tangent
    torch.testing.assert_close(fw_tan, ref_tan)
    # The custom Function's backward (used if gradients ever flow through it) is SDPA's.
    qq = q.clone().requires_grad_()
    jvp_safe_attention(qq, k, v, "chunked").sum().backward()
    qr = q.clone().requires_grad_()
    jvp_safe_attention(qr, k, v, "math").sum().backward()
    torch.testing.assert_close(qq.grad, qr.grad)


def _count_sdpa(monkeypatch) -> list:
    import model.attention as attention

    calls, original = [], attention._sdpa_bhnd
    monkeypatch.setattr(attention, "_sdpa_bhnd", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("mode", ["plain", "func.jvp", "forward_ad"])
def test_attention_backward_is_sdpas_own_without_a_second_forward(monkeypatch, mode):
    """With gradients on, _AttentionWithJVP runs SDPA once and back-propagates through SDPA's own backward
    (what its forward saved), in every way it is reached: the merged sCM pass (forward_ad duals),
    torch.func.jvp with gradients, an ordinary call.  Reference: F.scaled_dot_product_attention's gradients."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g).requires_grad_() for _ in range(3))
    dq, dk, dv, grad_out = (torch.randn(2, 3, 40, 8, generator=g) for _ in range(4))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    calls = _count_sdpa(monkeypatch)
    if mode == "func.jvp":
        out, _ = torch.func.jvp(_AttentionWithJVP.apply, (q, k, v), (dq, dk, dv))
    elif mode == "forward_ad":
        with forward_ad.dual_level():
            dual = _AttentionWithJVP.apply(*(forward_ad.make_dual(a, b) for a, b in ((q, dq), (k, dk), (v, dv))))
            out = forward_ad.unpack_dual(dual).primal
    else:
        out = _AttentionWithJVP.apply(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert len(calls) == 1  # no recompute in backward
    with pytest.raises(RuntimeError):  # its saved tensors are freed by the first backward
        torch.autograd.grad(out, (q, k, v), grad_out)


def test_attention_backward_recomputes_when_built_without_gradients(monkeypatch):
    """Inputs that did not require grad in forward (the no-grad JVP) keep the old path: nothing extra saved."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    with torch.no_grad():
        _, tangent = torch.func.jvp(_AttentionWithJVP.apply, (q, k, v), (q, k, v))
    assert not tangent.requires_grad
    calls = _count_sdpa(monkeypatch)
    out = _AttentionWithJVP.apply(q, k, v.requires_grad_())  # v requires grad: the graph path, dQ/dK are None
    out.sum().backward()
    assert len(calls) == 1 and v.grad is not None


def test_detached_attention_tangents_record_no_graph():
    """Within detached_attention_tangents (the merged sCM pass) the attention tangent records no autograd
    graph: its N-wide chunk probabilities are not kept alive by the tangents downstream."""
    from model.attention import detached_attention_tangents

    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, generator=g, requires_grad=True)
    x, dx = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    tangents = {}
    for detached in (False, True):
        with forward_ad.dual_level(), (detached_attention_tangents() if detached else contextlib.nullcontext()):
            h = forward_ad.make_dual(x, dx) @ w
            tangents[detached] = forward_ad.unpack_dual(_AttentionWithJVP.apply(h, h, h)).tangent
    assert tangents[False].requires_grad and not tangents[True].requires_grad
    torch.testing.assert_close(tangents[True], tangents[False].detach(), rtol=0, atol=0)


def test_tangent_does_not_depend_on_the_chunk_size(monkeypatch):
    """The device default (CPU: 128 queries, CUDA: 1024) and any other chunking give the same tangent: sizes
    that divide N, that do not (ragged last chunk), 1 and ≥ N, against the MATH kernel's JVP."""
    from model.attention import CPU_TANGENT_CHUNK, default_tangent_chunk

    assert default_tangent_chunk("cpu") == CPU_TANGENT_CHUNK == 128 and default_tangent_chunk("cuda") == 1024
    g = torch.Generator().manual_seed(3)
    q, k, v, dq, dk, dv = (torch.randn(2, 300, 2, 8, generator=g, dtype=torch.float64) for _ in range(6))
    _, ref = torch.func.jvp(lambda a, b, c: jvp_safe_attention(a, b, c, "math"), (q, k, v), (dq, dk, dv))
    for chunk in (None, 1, 7, 100, 128, 299, 300, 1024):
        monkeypatch.setattr(_AttentionWithJVP, "chunk_size", chunk)
        _, tangent = torch.func.jvp(lambda a, b, c: jvp_safe_attention(a, b, c, "chunked"), (q, k, v), (dq, dk, dv))
        torch.testing.assert_close(tangent, ref, rtol=1e-12, atol=1e-12, msg=f"chunk {chunk}")


def test_default_chunk_is_what_the_cpu_path_uses(monkeypatch):
    import model.attention as attention

    used = []
    original = attention.chunked_attention_tangent
    monkeypatch.setattr(attention, "chunked_attention_tangent", lambda *a: used.append(a[-1]) or original(*a))
    q = torch.randn(1, 20, 2, 8)
    torch.func.jvp(lambda a: jvp_safe_attention(a, a, a, "chunked"), (q,), (q,))
    assert used == [128]


def test_grad_pass_with_checkpointing_after_no_grad_jvp():
    model = tiny_transformer(timestep_scale=1.0)
    set_jvp_attention(model)
    model.enable_gradient_checkpointing()
    model.train()
    x, inputs = tiny_inputs()
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        torch.func.jvp(lambda xx: _call(model, xx, t, inputs), (x,), (torch.ones_like(x),))
    _call(model, x, t, inputs).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_config_roundtrip_and_override(tmp_path):
    model = tiny_transformer(timestep_scale=1.0)
    model.enable_interval_embedding("zero")
    model.save_pretrained(tmp_path / "m")
    loaded = DistillFluxTransformer2DModel.from_pretrained(tmp_path / "m")
    assert loaded.config.timestep_scale == 1.0 and loaded.config.interval_embedding
    assert loaded.time_text_embed.timestep_scale == 1.0
    stock = FluxTransformer2DModel(**TINY)
    stock.save_pretrained(tmp_path / "stock")
    as_x1 = DistillFluxTransformer2DModel.from_pretrained(tmp_path / "stock", timestep_scale=1.0)
    assert as_x1.time_text_embed.timestep_scale == 1.0
    torch.testing.assert_close(as_x1.state_dict()["x_embedder.weight"], stock.state_dict()["x_embedder.weight"])


class _ConstantVelocity(torch.nn.Module):
    """A 'perfect' flow model for a single (x₀, ε) pair: v ≡ ε − x₀ (σ_d-normalised)."""

    def __init__(self, velocity: torch.Tensor):
        super().__init__()
        self.velocity = velocity
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.time_text_embed = torch.nn.Identity()
        self.inner_dim = 4

    def forward(self, z, timestep, **kwargs):
        self.time_text_embed(timestep)
        return (self.velocity + 0 * self.anchor + 0 * z,)


def test_trigflow_conversion_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    t = torch.tensor([0.2, 0.9, 1.4])
    wrapper = TrigFlowFlux(_ConstantVelocity(eps - x0))
    tb = t.reshape(-1, 1, 1)
    x_scaled = torch.cos(tb) * x0 + torch.sin(tb) * eps  # x_t/σ_d
    inputs = FluxInputs(torch.zeros(3, 1, 1), torch.zeros(3, 1), torch.zeros(1, 3), torch.zeros(4, 3))
    F = wrapper(x_scaled, t, inputs)
    # TrigFlow target: d(x_t/σ_d)/dt = cos t·ε − sin t·x₀.
    torch.testing.assert_close(F, torch.cos(tb) * eps - torch.sin(tb) * x0, rtol=1e-5, atol=1e-5)


def test_interval_embedding_inits():
    teacher = tiny_transformer(timestep_scale=1.0)
    zero = tiny_transformer(timestep_scale=1.0)
    zero.enable_interval_embedding("zero")
    copy = tiny_transformer(timestep_scale=1.0)
    copy.enable_interval_embedding("copy")
    x, inputs = tiny_inputs()
    t, h = torch.tensor([0.3, 0.7]), torch.tensor([0.1, 0.4])
    with torch.no_grad():
        assert torch.equal(_call(zero, x, t, inputs, interval=h), _call(teacher, x, t, inputs))
        assert not torch.allclose(_call(copy, x, t, inputs, interval=h), _call(teacher, x, t, inputs))
    for name, p in copy.time_text_embed.interval_embedder.state_dict().items():
        assert torch.equal(p, teacher.time_text_embed.timestep_embedder.state_dict()[name])
    with pytest.raises(ValueError, match="interval"):
        _call(copy, x, t, inputs)


def test_sinusoid_equals_diffusers_timesteps_projection():
    model = tiny_transformer(timestep_scale=1000.0)
    t = torch.tensor([0.0, 0.25, 0.5, 0.999])
    embed = model.time_text_embed
    torch.testing.assert_close(embed.sinusoid(t), embed.time_proj(t * 1000), rtol=1e-5, atol=1e-5)
    assert embed.sinusoid(t.double()).dtype == torch.float64


def test_time_inputs_stay_float32_under_bf16_weights():
    """bf16 would round t=0.3011 to 0.3008; the embedding must see the exact float32 value."""
    model = tiny_transformer(timestep_scale=1.0).to(torch.bfloat16)
    embed = model.time_text_embed
    seen = []
    original = embed.sinusoid
    embed.sinusoid = lambda value, scale=None: seen.append(value) or original(value, scale)
    x, inputs = tiny_inputs()
    t = torch.tensor([0.3011, 0.7])
    with torch.no_grad():
        _call(model, x, t, inputs)
    assert seen[0].dtype == torch.float32
    assert math.isclose(seen[0][0].item(), 0.3011, rel_tol=1e-6)
