"""torch.compile of a student with the JVP-safe attention processor (issue #19).

References: the same module run eagerly (outputs and tangents), and dynamo's own graph-break count.
``aot_eager`` compiles through AOTAutograd like inductor, without the C++ build (CPU test time).
"""
from __future__ import annotations

import pytest
import torch

from model.attention import set_jvp_attention
from tests.model_factory import tiny_inputs, tiny_transformer


@pytest.fixture()
def student():
    torch._dynamo.reset()
    model = tiny_transformer(timestep_scale=1.0, interval_embedding=True)
    set_jvp_attention(model)
    x, inputs = tiny_inputs()
    t, h = torch.tensor([0.3, 0.8]), torch.tensor([0.1, 0.5])

    def velocity(x, t):
        return model(x, timestep=t, interval=h, **inputs.kwargs(torch.float32))[0]

    yield model, velocity, x, t
    torch._dynamo.reset()


@pytest.mark.parametrize("grad", [False, True])
def test_ordinary_forward_is_one_graph_without_breaks(student, grad):
    _, velocity, x, t = student
    with torch.set_grad_enabled(grad):
        explained = torch._dynamo.explain(velocity)(x, t)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_forward_equals_eager(student):
    _, velocity, x, t = student
    compiled = torch.compile(velocity, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), velocity(x, t), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_grad_pass_equals_eager(student):
    _, velocity, x, t = student
    compiled = torch.compile(velocity, backend="aot_eager", fullgraph=True)
    x_req = x.clone().requires_grad_()
    compiled(x_req, t).square().sum().backward()
    x_ref = x.clone().requires_grad_()
    velocity(x_ref, t).square().sum().backward()
    torch.testing.assert_close(x_req.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_jvp_of_a_compiled_student_equals_eager(student):
    """torch.func.jvp around a compiled module: dynamo hands the frame back to eager (no silent fused path)."""
    _, velocity, x, t = student
    dx, dt = torch.randn_like(x), torch.ones_like(t)
    ref = torch.func.jvp(velocity, (x, t), (dx, dt))
    out = torch.func.jvp(torch.compile(velocity, backend="aot_eager"), (x, t), (dx, dt))
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_jvp_equals_eager(student):
    """torch.compile around torch.func.jvp: traced into one graph, same tangent."""
    _, velocity, x, t = student
    dx, dt = torch.randn_like(x), torch.ones_like(t)

    def jvp(x, t, dx, dt):
        return torch.func.jvp(velocity, (x, t), (dx, dt))

    explained = torch._dynamo.explain(jvp)(x, t, dx, dt)
    assert explained.graph_break_count == 0
    ref = jvp(x, t, dx, dt)
    out = torch.compile(jvp, backend="aot_eager")(x, t, dx, dt)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
