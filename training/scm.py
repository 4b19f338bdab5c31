"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song 2025; T2I-Distill's recipe).

Notation: σ_d = ``sigma_data``; x₀ = σ_d·(VAE latent − shift)·scale; z ~ N(0, σ_d² I);
x_t = cos t·x₀ + sin t·z,  t ∈ (0, π/2);  F_θ(x_t/σ_d, t) the student (TrigFlow view of FLUX).

Per sample:
    τ ~ LogNormal(P_mean, P_std),  t = arctan(τ / σ_d)                              (time proposal)
    w ~ Uniform(cfg_scales)                                    (guidance embedding, teacher and student)
    dx_t/dt = σ_d·F_teacher(x_t/σ_d, t, w)                                     (teacher PF-ODE velocity)
    (F⁻, cos t·sin t·dF⁻/dt) = JVP of F_θ⁻ at (x_t/σ_d, t) along (cos t·sin t·(dx_t/dt)/σ_d, cos t·sin t)
    r = min(1, step / tangent_warmup_steps)                                          (tangent warm-up)
    g = −cos²t·(σ_d·F⁻ − dx_t/dt) − r·(cos t·sin t·x_t + σ_d·cos t·sin t·dF⁻/dt)
    g ← g / (‖g‖ + c),  c = 0.1                                                  (tangent normalisation)
    loss = λ · mean[ e^{−logvar}/(σ_d·tan t) · ‖F_θ − F⁻ − g‖²/D + logvar ]     (adaptive weighting)
    logvar = Linear(time_text_embed(t, w, pooled)), ×1 sinusoid at the TrigFlow angle t (the release;
             ``logvar_input="flow_time"`` reads FLUX's own conditioning at s instead, see model/trigflow.py)

θ⁻ = stopgrad(θ): F⁻ is the detached output of the same student (no EMA, as the release).
The JVP runs under ``no_grad`` on the unwrapped student (``torch.func.jvp`` cannot go through DDP);
the gradient pass is a second, ordinary forward through the (possibly DeepSpeed/DDP-wrapped) model,
so gradient checkpointing and fused attention stay usable there.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from model.attention import set_jvp_attention
from model.trigflow import LOGVAR_INPUTS, FluxInputs, TrigFlowFlux
from training.common import LossOutput, per_sample_sq_norm, sample_guidance


@dataclass
class SCMLossConfig:
    sigma_data: float = 0.5
    logit_mean: float = 0.2  # P_mean of log(σ_d·tan t)
    logit_std: float = 1.6  # P_std
    tangent_warmup_steps: int = 4000
    tangent_norm_eps: float = 0.1
    scm_lambda: float = 1.0
    cfg_scales: tuple[float, ...] = (4.0, 4.5, 5.0)


class SCMLoss:
    """The sCM distillation loss (see module docstring for the equations)."""

    def __init__(self, config: SCMLossConfig):
        self.config = config

    def sample_time(self, batch: int, device) -> torch.Tensor:
        c = self.config
        tau = torch.exp(torch.randn(batch, device=device) * c.logit_std + c.logit_mean)
        return torch.atan(tau / c.sigma_data)

    def tangent_warmup(self, step: int) -> float:
        return min(1.0, step / max(1, self.config.tangent_warmup_steps))

    def __call__(self, student: TrigFlowFlux, student_for_jvp: TrigFlowFlux, teacher: TrigFlowFlux,
                 x0_latents: torch.Tensor, inputs: FluxInputs, step: int,
                 noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> LossOutput:
        """``x0_latents``: packed (VAE − shift)·scale latents [B, N, C]; ``inputs.guidance`` may be preset."""
        c = self.config
        sd = c.sigma_data
        b = x0_latents.shape[0]
        device = x0_latents.device
        x0 = x0_latents.float() * sd
        if t is None:
            t = self.sample_time(b, device)
        if noise is None:
            noise = torch.randn_like(x0) * sd
        if inputs.guidance is None:
            inputs.guidance = sample_guidance(b, c.cfg_scales, device)
        tb = t.reshape(-1, 1, 1)
        cos_t, sin_t = torch.cos(tb), torch.sin(tb)
        x_t = cos_t * x0 + sin_t * noise

        with torch.no_grad():
            dxt_dt = sd * teacher(x_t / sd, t, inputs)
            tangents = (cos_t * sin_t * dxt_dt / sd, (torch.cos(t) * torch.sin(t)))
            _, cs_dF_dt = torch.func.jvp(lambda x, tt: student_for_jvp(x, tt, inputs), (x_t / sd, t), tangents)

        F_theta, logvar = student(x_t / sd, t, inputs, return_logvar=True)
        F_minus = F_theta.detach()
        r = self.tangent_warmup(step)
        g = -(cos_t ** 2) * (sd * F_minus - dxt_dt) - r * (cos_t * sin_t * x_t + sd * cs_dF_dt)
        g_norm = per_sample_sq_norm(g).sqrt()
        g = g / (g_norm.reshape(-1, 1, 1) + c.tangent_norm_eps)

        weight = 1.0 / (sd * torch.tan(t))
        sq_err = (F_theta - F_minus - g).flatten(1).square().mean(1)
        per_sample = weight / torch.exp(logvar) * sq_err + logvar
        loss = per_sample.mean() * c.scm_lambda
        logs = {"loss_sCM": loss.item(), "l2_loss": sq_err.mean().item(), "g_norm": g_norm.mean().item(),
                "mean_weight": weight.mean().item(), "logvar": logvar.mean().item(), "tangent_warmup": r}
        terms = {"teacher_velocity": dxt_dt, "jvp_tangent": cs_dF_dt, "student_output": F_minus,
                 "logvar": logvar.detach(), "normalised_tangent": g}
        return LossOutput(loss, logs, terms)


class SCMMethod:
    """sCM on the shared core: TrigFlow student with a logvar head, frozen TrigFlow teacher."""

    name = "sCM"

    def __init__(self, loss: SCMLoss, jvp_attention: str = "auto", logvar_input: str = "trig_time"):
        if logvar_input not in LOGVAR_INPUTS:
            raise ValueError(f"--logvar_input {logvar_input!r} is not one of {', '.join(LOGVAR_INPUTS)}")
        self.loss_fn = loss
        self.jvp_attention = jvp_attention
        self.logvar_input = logvar_input

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SCMMethod":
        """Build from the parsed flags of ``train_sCM.py``."""
        config = SCMLossConfig(sigma_data=args.sigma_data, logit_mean=args.logit_mean, logit_std=args.logit_std,
                               tangent_warmup_steps=args.tangent_warmup_steps, tangent_norm_eps=args.tangent_norm_eps,
                               scm_lambda=args.scm_lambda, cfg_scales=args.scm_cfg_scale)
        return cls(SCMLoss(config), args.jvp_attention, args.logvar_input)

    def build_models(self, args, teacher, student):
        set_jvp_attention(student, self.jvp_attention)  # only the student goes through a JVP
        return TrigFlowFlux(student, with_logvar=True, logvar_input=self.logvar_input), TrigFlowFlux(teacher)

    def loss(self, student, student_unwrapped, teacher, latents, inputs, step) -> LossOutput:
        return self.loss_fn(student, student_unwrapped, teacher, latents, inputs, step)

    def export_state_dict(self, student: TrigFlowFlux) -> tuple[dict, dict]:
        state = dict(student.transformer.state_dict())
        state.update({f"logvar_linear.{k}": v for k, v in student.logvar_linear.state_dict().items()})
        return state, dict(student.transformer.config)
