"""SCMLoss against an independent hand computation (finite differences instead of the JVP)."""
from __future__ import annotations

import math

import pytest
import torch

from model.attention import set_jvp_attention
from model.trigflow import TrigFlowFlux
from model_factory import stock_time_text_embed, tiny_inputs, tiny_transformer
from training.scm import SCMLoss, SCMLossConfig


def _models(logvar_input: str = "trig_time"):
    student_tf = tiny_transformer(seed=0, timestep_scale=1.0, dtype=torch.float64)
    set_jvp_attention(student_tf)
    student = TrigFlowFlux(student_tf, with_logvar=True, logvar_input=logvar_input).double()
    with torch.no_grad():  # a trained head, not the zero-bias init: the logvar term must matter in the loss
        student.logvar_linear.weight.mul_(3.0)
        student.logvar_linear.bias.fill_(0.4)
    teacher = TrigFlowFlux(tiny_transformer(seed=1, timestep_scale=1.0, dtype=torch.float64))
    return student, teacher


def _hand_logvar(student: TrigFlowFlux, t: torch.Tensor, inputs, logvar_input: str) -> torch.Tensor:
    """logvar = Linear(time_text_embed(τ, g, pooled)) with diffusers' stock embedding (×1 model: scale 1).

    τ = t, the TrigFlow angle (the release), or τ = s = sin t/(cos t + sin t), the flow time."""
    tau = t if logvar_input == "trig_time" else torch.sin(t) / (torch.cos(t) + torch.sin(t))
    cond = stock_time_text_embed(student.transformer)(tau, inputs.guidance, inputs.pooled_projections)
    return (cond @ student.logvar_linear.weight.T + student.logvar_linear.bias).reshape(-1).float()


@pytest.mark.parametrize("logvar_input", ["trig_time", "flow_time"])
def test_scm_loss_equals_hand_computation(logvar_input):
    sd = 0.5
    cfg = SCMLossConfig(sigma_data=sd, tangent_warmup_steps=4, scm_lambda=0.7)
    student, teacher = _models(logvar_input)
    latents, inputs = tiny_inputs(dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g, dtype=torch.float64) * sd
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    step = 2  # r = 0.5

    out = SCMLoss(cfg)(student, student, teacher, latents, inputs, step, noise=noise, t=t)

    # --- by hand, from the formulas, with a central difference for the total derivative dF/dt ---
    with torch.no_grad():
        x0 = latents * sd
        c, s = torch.cos(t).reshape(-1, 1, 1), torch.sin(t).reshape(-1, 1, 1)
        x_t = c * x0 + s * noise
        dxdt = sd * teacher(x_t / sd, t, inputs)
        F_minus = student(x_t / sd, t, inputs)
        eps = 1e-3
        F_plus_eps = student((x_t + eps * dxdt) / sd, t + eps, inputs)
        F_minus_eps = student((x_t - eps * dxdt) / sd, t - eps, inputs)
        dFdt = (F_plus_eps - F_minus_eps) / (2 * eps)
        r = 0.5
        gvec = -(c ** 2) * (sd * F_minus - dxdt) - r * (c * s * x_t + sd * c * s * dFdt)
        gnorm = gvec.flatten(1).norm(dim=1)
        gvec = gvec / (gnorm.reshape(-1, 1, 1) + 0.1)
        logvar = _hand_logvar(student, t, inputs, logvar_input)
        weight = 1 / (sd * torch.tan(t))
        per_elem = (weight / torch.exp(logvar)).reshape(-1, 1, 1) * gvec ** 2 + logvar.reshape(-1, 1, 1)
        expected = per_elem.mean() * 0.7  # at θ = θ⁻, F_θ − F⁻ = 0

    assert math.isclose(out.loss.item(), expected.item(), rel_tol=1e-5)
    torch.testing.assert_close(out.terms["logvar"], logvar, rtol=1e-6, atol=1e-6)
    assert math.isclose(out.logs["g_norm"], gnorm.mean().item(), rel_tol=1e-5)
    got = out.terms["normalised_tangent"]
    assert ((got - gvec).norm() / gvec.norm()).item() < 1e-4  # elementwise limited by the FD noise


def test_tangent_normalised_and_warmup():
    loss = SCMLoss(SCMLossConfig(tangent_warmup_steps=4))
    assert [loss.tangent_warmup(s) for s in (0, 1, 2, 4, 100)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    student, teacher = _models()
    latents, inputs = tiny_inputs(dtype=torch.float64)
    out = loss(student, student, teacher, latents, inputs, step=0)
    norms = out.terms["normalised_tangent"].flatten(1).norm(dim=1)
    assert torch.all(norms < 1) and torch.all(norms > 0)
    # ‖g/(‖g‖+c)‖ = ‖g‖/(‖g‖+c)  ⇒  ‖g‖ = c·n/(1 − n): recovers the logged raw norms.
    recovered = 0.1 * norms / (1 - norms)
    # (the logged norm is accumulated in float32: ~1e-6 relative error, depending on thread count)
    assert math.isclose(recovered.mean().item(), out.logs["g_norm"], rel_tol=1e-5)


def test_loss_gradient_reaches_student_and_logvar_not_teacher():
    student, teacher = _models()
    latents, inputs = tiny_inputs(dtype=torch.float64)
    out = SCMLoss(SCMLossConfig(tangent_warmup_steps=1))(student, student, teacher, latents, inputs, step=1)
    out.loss.backward()
    assert student.logvar_linear.weight.grad is not None and student.logvar_linear.weight.grad.abs().sum() > 0
    assert student.transformer.proj_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_time_proposal_matches_lognormal_in_sigma_tan_t():
    cfg = SCMLossConfig(logit_mean=0.2, logit_std=1.6)
    torch.manual_seed(0)
    t = SCMLoss(cfg).sample_time(200_000, "cpu")
    assert torch.all((t > 0) & (t < math.pi / 2))
    log_tau = torch.log(cfg.sigma_data * torch.tan(t))
    assert abs(log_tau.mean().item() - 0.2) < 0.02 and abs(log_tau.std().item() - 1.6) < 0.02
