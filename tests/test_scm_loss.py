"""SCMLoss against an independent hand computation (finite differences instead of the JVP)."""
from __future__ import annotations

import argparse
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


# ---------------------------------------------------------------------------------------------
# --merged_jvp: F_θ with gradients and dF/dt from one forward-mode pass (training/scm.py)
# ---------------------------------------------------------------------------------------------

def _loss_and_grads(student, teacher, merged: bool, dtype=torch.float64, step: int = 2):
    """One sCM loss + backward at fixed (noise, t): (LossOutput, {parameter name: gradient})."""
    latents, inputs = tiny_inputs(dtype=dtype)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3), dtype=dtype) * 0.5
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    cfg = SCMLossConfig(tangent_warmup_steps=4, scm_lambda=0.7, merged_jvp=merged)
    out = SCMLoss(cfg)(student, student, teacher, latents, inputs, step, noise=noise, t=t)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("logvar_input", ["trig_time", "flow_time"])
def test_merged_pass_equals_two_passes_in_float64(logvar_input):
    """Same loss, terms and every parameter gradient as the release's two passes (float64: 1e-12; measured 0)."""
    student, teacher = _models(logvar_input)
    two, two_grads = _loss_and_grads(student, teacher, merged=False)
    one, one_grads = _loss_and_grads(student, teacher, merged=True)
    assert torch.equal(one.terms["student_output"], two.terms["student_output"])  # F_θ: the same ops
    assert torch.equal(one.terms["logvar"], two.terms["logvar"])
    torch.testing.assert_close(one.terms["jvp_tangent"], two.terms["jvp_tangent"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(one.loss, two.loss, rtol=1e-12, atol=0)
    assert one_grads.keys() == two_grads.keys() and len(one_grads) == len(list(student.parameters()))
    for name, grad in two_grads.items():
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    assert not one.terms["jvp_tangent"].requires_grad  # θ⁻ = stopgrad θ: no gradient through the tangent


def _float32_models():
    student_tf = tiny_transformer(seed=0, timestep_scale=1.0)
    set_jvp_attention(student_tf, "chunked")
    student = TrigFlowFlux(student_tf, with_logvar=True)
    return student, TrigFlowFlux(tiny_transformer(seed=1, timestep_scale=1.0))


def test_merged_pass_float32_tolerance():
    """float32: F_θ and logvar bit for bit; the tangent within rounding (PyTorch evaluates some forward-mode
    formulas, e.g. SiLU's, with other kernels when gradients are on: measured 1.2e-7 relative), and so are the
    loss and the gradients."""
    student, teacher = _float32_models()
    two, two_grads = _loss_and_grads(student, teacher, merged=False, dtype=torch.float32)
    one, one_grads = _loss_and_grads(student, teacher, merged=True, dtype=torch.float32)
    assert torch.equal(one.terms["student_output"], two.terms["student_output"])
    assert torch.equal(one.terms["logvar"], two.terms["logvar"])
    d1, d2 = one.terms["jvp_tangent"], two.terms["jvp_tangent"]
    assert ((d1 - d2).norm() / d2.norm()).item() < 1e-6
    torch.testing.assert_close(one.loss, two.loss, rtol=1e-6, atol=0)
    for name, grad in two_grads.items():
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_merged_backward_is_the_ordinary_forwards_bit_for_bit():
    """The gradient path itself is exact in float32: for the same upstream gradients, the merged pass's F_θ and
    logvar back-propagate exactly as the ordinary forward's (the attention runs SDPA's own backward)."""
    from training.scm import merged_student_pass, two_student_passes

    student, _ = _float32_models()
    latents, inputs = tiny_inputs(guidance=4.5)
    g = torch.Generator().manual_seed(4)
    x, t = latents, torch.tensor([0.4, 1.1])
    tangents = (torch.randn(x.shape, generator=g), torch.cos(t) * torch.sin(t))
    w_F, w_lv = torch.randn(x.shape, generator=g), torch.randn(2, generator=g)
    grads = []
    for passes in (two_student_passes, merged_student_pass):
        F_theta, logvar, _ = passes(student, student, x, t, tangents, inputs)
        ((F_theta * w_F).sum() + (logvar * w_lv).sum()).backward()
        grads.append([p.grad.clone() for p in student.parameters()])
        student.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_merged_pass_with_a_lora_student():
    """A LoRA student (frozen base shared with the teacher, trainable adapters): same F_θ, loss and adapter
    gradients as the two passes."""
    from model.lora import LoraSpec
    from training.lora import build_tied_models
    from training.scm import SCMMethod

    base = tiny_transformer(timestep_scale=1.0)
    student, teacher = build_tied_models(argparse.Namespace(), SCMMethod(SCMLoss(SCMLossConfig()), "chunked"), base,
                                         LoraSpec(rank=4, alpha=8), torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at initialisation: random B so that the adapters matter
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    two, two_grads = _loss_and_grads(student, teacher, merged=False, dtype=torch.float32)
    one, one_grads = _loss_and_grads(student, teacher, merged=True, dtype=torch.float32)
    assert torch.equal(one.terms["student_output"], two.terms["student_output"])
    torch.testing.assert_close(one.loss, two.loss, rtol=1e-6, atol=0)
    assert any(".lora_B" in name for name in two_grads) and one_grads.keys() == two_grads.keys()
    for name, grad in two_grads.items():
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class DeepSpeedEngine(torch.nn.Module):
    """Stand-in with the one method merged_pass_blocker asks DeepSpeed's engine (matched by class name)."""

    def __init__(self, module, stage):
        super().__init__()
        self.module, self.stage = module, stage

    def zero_optimization_stage(self):
        return self.stage


def test_merged_pass_refuses_what_it_cannot_train():
    from training.scm import merged_pass_blocker

    student, teacher = _float32_models()
    assert merged_pass_blocker(student, student) is None
    assert merged_pass_blocker(DeepSpeedEngine(student, 2), student) is None
    assert "ZeRO-3" in merged_pass_blocker(DeepSpeedEngine(student, 3), student)
    assert "torch.compile" in merged_pass_blocker(torch.compile(student), student)
    student.transformer.enable_gradient_checkpointing()
    reason = merged_pass_blocker(student, student)
    assert "gradient checkpointing" in reason
    with pytest.raises(ValueError, match="--merged_jvp cannot be used here: gradient checkpointing"):
        _loss_and_grads(student, teacher, merged=True, dtype=torch.float32)
    _loss_and_grads(student, teacher, merged=False, dtype=torch.float32)  # the two passes still train it


def test_gradient_checkpointing_really_breaks_the_merged_pass():
    """Why it is refused: the checkpointed recompute (no tangents) saves other tensors than the dual forward."""
    from torch.autograd import forward_ad

    student, _ = _float32_models()
    student.transformer.enable_gradient_checkpointing()
    student.train()
    latents, inputs = tiny_inputs(guidance=4.5)
    t = torch.tensor([0.4, 1.1])
    with forward_ad.dual_level():
        F_dual = student(forward_ad.make_dual(latents, torch.randn_like(latents)), forward_ad.make_dual(t, t), inputs)
        F_theta = forward_ad.unpack_dual(F_dual).primal
    with pytest.raises(Exception, match="(?i)checkpoint|saved|recomput"):
        F_theta.square().sum().backward()
