"""Selection of the optional flash-JVP kernel (CPU) and its agreement with the exact chunked path (CUDA)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import model.attention as attention
import model.flash_jvp as flash_jvp
from model.attention import jvp_safe_attention


def _fake(device: str, shape=(1, 2, 64, 64), dtype=torch.bfloat16):
    return SimpleNamespace(device=torch.device(device) if device != "cuda" else SimpleNamespace(type="cuda"),
                           dtype=dtype, shape=shape)


@pytest.fixture
def kernel_installed(monkeypatch):
    monkeypatch.setattr(flash_jvp, "load_flash_jvp_kernel", lambda: object())


def test_auto_picks_flash_only_on_cuda_with_the_package(monkeypatch, kernel_installed):
    cuda, cpu = _fake("cuda"), _fake("cpu")
    assert flash_jvp.resolve_jvp_attention("auto", cuda, cuda, cuda) == "flash"
    assert flash_jvp.resolve_jvp_attention("auto", cpu, cpu, cpu) == "chunked"
    monkeypatch.setattr(flash_jvp, "load_flash_jvp_kernel", lambda: None)  # package missing
    assert flash_jvp.resolve_jvp_attention("auto", cuda, cuda, cuda) == "chunked"
    assert "pip install" in flash_jvp.flash_jvp_unusable_reason(cuda, cuda, cuda)


@pytest.mark.parametrize("shape, dtype, words", [
    ((1, 2, 64, 96), torch.bfloat16, "head dimension 96"),  # FLUX's 128 is fine, 96 is not a kernel size
    ((1, 2, 63, 64), torch.bfloat16, "sequence length 63"),
    ((1, 2, 16, 64), torch.bfloat16, "sequence length 16"),
    ((1, 2, 64, 64), torch.float64, "dtype"),
])
def test_auto_falls_back_outside_the_kernel_limits(kernel_installed, shape, dtype, words):
    t = _fake("cuda", shape, dtype)
    assert flash_jvp.resolve_jvp_attention("auto", t, t, t) == "chunked"
    with pytest.raises(RuntimeError, match=words):
        flash_jvp.resolve_jvp_attention("flash", t, t, t)


def test_forced_flash_on_cpu_is_a_clear_error():
    q = torch.randn(1, 32, 2, 16)
    with pytest.raises(RuntimeError, match="runs on cpu, the kernel is CUDA-only"):
        jvp_safe_attention(q, q, q, "flash")


def test_auto_routes_to_the_kernel_and_keeps_the_tangent(monkeypatch):
    """When the kernel is selected, the attention call goes to it (here a stand-in computing exact
    attention), inside torch.func.jvp, and the tangent equals the chunked path's."""
    calls = []

    def stand_in(q, k, v):
        calls.append(q.shape)
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    g = torch.Generator().manual_seed(0)
    prim = tuple(torch.randn(2, 40, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    tang = tuple(torch.randn(2, 40, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    _, ref = torch.func.jvp(lambda q, k, v: jvp_safe_attention(q, k, v, "chunked"), prim, tang)
    monkeypatch.setattr(attention, "resolve_jvp_attention", lambda impl, q, k, v: "flash")
    monkeypatch.setattr(attention, "flash_jvp_attention", stand_in)
    _, out = torch.func.jvp(lambda q, k, v: jvp_safe_attention(q, k, v, "auto"), prim, tang)
    assert calls and calls[0] == (2, 2, 40, 16)  # [B, H, N, D] layout handed to the kernel
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_auto_keeps_the_chunked_path_when_the_primal_needs_gradients(monkeypatch):
    """The merged sCM pass trains through the JVP's primal: 'auto' then takes the chunked path (fused SDPA
    with its own backward) even where the kernel is usable; without gradients it still takes the kernel."""
    from torch.autograd import forward_ad

    calls = []
    monkeypatch.setattr(attention, "resolve_jvp_attention", lambda impl, q, k, v: "flash")
    monkeypatch.setattr(attention, "flash_jvp_attention", lambda q, k, v: calls.append(1) or
                        torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v)
    w = torch.randn(16, 16, requires_grad=True)
    x, dx = torch.randn(2, 40, 2, 16), torch.randn(2, 40, 2, 16)
    with forward_ad.dual_level():
        h = forward_ad.make_dual(x, dx) @ w
        jvp_safe_attention(h, h, h, "auto")
        assert not calls
        with torch.no_grad():
            jvp_safe_attention(h, h, h, "auto")
    assert calls == [1]
    _, inside_jvp = torch.func.jvp(lambda a: jvp_safe_attention(a @ w, a @ w, a @ w, "auto"), (x,), (dx,))
    assert calls == [1]  # torch.func.jvp's wrappers hide requires_grad; the check looks through them


def test_chunked_tangent_matches_math_kernel_on_cpu():
    """The default CPU path ("auto" → chunked) against PyTorch's MATH kernel, several ragged chunks."""
    g = torch.Generator().manual_seed(1)
    prim = tuple(torch.randn(2, 37, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    tang = tuple(torch.randn(2, 37, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    old = attention._AttentionWithJVP.chunk_size
    attention._AttentionWithJVP.chunk_size = 10
    try:
        out_c, d_c = torch.func.jvp(lambda q, k, v: jvp_safe_attention(q, k, v, "auto"), prim, tang)
    finally:
        attention._AttentionWithJVP.chunk_size = old
    out_m, d_m = torch.func.jvp(lambda q, k, v: jvp_safe_attention(q, k, v, "math"), prim, tang)
    torch.testing.assert_close(out_c, out_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_c, d_m, rtol=1e-10, atol=1e-10)


CUDA_KERNEL = torch.cuda.is_available() and flash_jvp.load_flash_jvp_kernel() is not None


@pytest.mark.skipif(not CUDA_KERNEL, reason="needs CUDA and the optional jvp-flash-attention kernel")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_flash_kernel_matches_chunked_on_cuda(dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 1056, 4, 64)  # FLUX layout [B, N, H, D]; 1024 image + 32 text tokens
    prim = tuple(torch.randn(shape, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    tang = tuple(torch.randn(shape, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    with torch.no_grad():
        out_f, d_f = torch.func.jvp(lambda q, k, v: jvp_safe_attention(q, k, v, "flash"), prim, tang)
        out_c, d_c = torch.func.jvp(lambda q, k, v: jvp_safe_attention(q, k, v, "chunked"), prim, tang)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    assert rel(out_f, out_c) < tol
    assert rel(d_f, d_c) < tol


@pytest.mark.skipif(not CUDA_KERNEL, reason="needs CUDA and the optional jvp-flash-attention kernel")
def test_flash_kernel_through_the_flux_student_on_cuda():
    from model.attention import set_jvp_attention
    from tests.model_factory import tiny_inputs, tiny_transformer

    latents, inputs = tiny_inputs(batch=2, side=8, n_text=8)  # 72 tokens, head_dim 8 → widen the heads
    results = {}
    for impl in ("flash", "chunked"):
        model = tiny_transformer(attention_head_dim=16, axes_dims_rope=(4, 6, 6)).cuda()
        set_jvp_attention(model, impl)
        cuda_inputs = type(inputs)(*(x.cuda() if torch.is_tensor(x) else x for x in
                                     (inputs.encoder_hidden_states, inputs.pooled_projections, inputs.txt_ids,
                                      inputs.img_ids, inputs.guidance)))
        fn = lambda x, t: model(x, timestep=t, **cuda_inputs.kwargs(torch.float32))[0]  # noqa: E731
        x, t = latents.cuda(), torch.full((2,), 0.5, device="cuda")
        with torch.no_grad():
            results[impl] = torch.func.jvp(fn, (x, t), (torch.ones_like(x), torch.ones_like(t)))[1]
    rel = float((results["flash"] - results["chunked"]).norm() / results["chunked"].norm())
    assert rel < 2e-3
