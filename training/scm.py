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

F⁻ and F_θ are the same value, so that step runs the student forward twice.  ``merged_jvp``
(``--merged_jvp``) computes (F_θ, logvar) with gradients and cos t·sin t·dF_θ/dt in ONE forward-mode
pass (``torch.autograd.forward_ad`` dual inputs, gradients on, through the possibly wrapped student):
every op's primal is computed once and recorded for backward, its tangent beside it; the tangent is
then detached (F⁻ = stopgrad F_θ) and the dual level closed before backward, which frees the tangents.
F_θ, logvar and the backward are those of the ordinary forward, bit for bit with diffusers' default
attention backend (the attention keeps SDPA's own backward, model/attention.py).  The tangent differs
from the no-grad
``torch.func.jvp``'s by rounding only (≈1e-7 relative in float32, 0 in float64 on the tests' model),
because PyTorch evaluates the forward-mode formulas of some ops (SiLU, GELU, ...) with other,
differentiable kernels when gradients are on; so it is not the release's numbers and stays off by
default.  It costs memory: until the level closes, the tensors saved for backward keep their tangents
alive (autograd saves a tensor's forward gradient with it), about one more copy of the activations
(medium model, 1024 tokens, CPU: peak 1.65×, step time 0.87×; benchmarks/train_step.py --merged_jvp).
:func:`merged_pass_blocker` lists where it cannot run.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import forward_ad

from model.attention import detached_attention_tangents, set_jvp_attention
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
    merged_jvp: bool = False  # F_θ and dF_θ/dt from one forward-mode pass (module docstring)


def merged_pass_blocker(student: nn.Module, student_for_jvp: nn.Module) -> str | None:
    """Why the merged pass cannot train this student (None: it can).

    It feeds forward-mode dual tensors, with gradients on, through ``student``: the module the gradients
    must flow through (possibly DDP- or DeepSpeed-wrapped by accelerate).
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(student, DistributedDataParallel) and (student.find_unused_parameters or student.static_graph):
        return ("DistributedDataParallel with find_unused_parameters or static_graph routes the outputs through an "
                "autograd Function without a forward-mode derivative")
    if type(student).__name__ == "DeepSpeedEngine" and student.zero_optimization_stage() >= 3:
        return "DeepSpeed ZeRO-3's parameter hooks are autograd Functions without a forward-mode derivative"
    if any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in (student, student_for_jvp)):
        return ("torch.compile does not trace calls with forward-mode dual tensors, so the merged pass would run "
                "the compiled student eagerly")
    if any(getattr(m, "gradient_checkpointing", False) is True for m in student_for_jvp.modules()):
        return ("gradient checkpointing recomputes the blocks in backward without their tangents, which does not "
                "match what the forward saved")
    return None


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
        passes = merged_student_pass if c.merged_jvp else two_student_passes
        F_theta, logvar, cs_dF_dt = passes(student, student_for_jvp, x_t / sd, t, tangents, inputs)
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


StudentPass = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (F_θ, logvar) with gradients, cos t·sin t·dF_θ/dt


def two_student_passes(student: nn.Module, student_for_jvp: nn.Module, x: torch.Tensor, t: torch.Tensor,
                       tangents: tuple[torch.Tensor, torch.Tensor], inputs: FluxInputs) -> StudentPass:
    """The release: a no-grad JVP of the unwrapped student (its primal F⁻ is dropped), then a grad forward."""
    with torch.no_grad():
        _, cs_dF_dt = torch.func.jvp(lambda x_, t_: student_for_jvp(x_, t_, inputs), (x, t), tangents)
    F_theta, logvar = student(x, t, inputs, return_logvar=True)
    return F_theta, logvar, cs_dF_dt


def merged_student_pass(student: nn.Module, student_for_jvp: nn.Module, x: torch.Tensor, t: torch.Tensor,
                        tangents: tuple[torch.Tensor, torch.Tensor], inputs: FluxInputs) -> StudentPass:
    """One forward-mode pass with gradients on: (F_θ, logvar) keep their autograd graph, the tangent is detached.

    Raises ValueError where :func:`merged_pass_blocker` finds the student unfit."""
    reason = merged_pass_blocker(student, student_for_jvp)
    if reason is not None:
        raise ValueError(f"--merged_jvp cannot be used here: {reason}; drop --merged_jvp (two student passes)")
    with forward_ad.dual_level(), detached_attention_tangents():
        F_dual, logvar = student(forward_ad.make_dual(x, tangents[0]), forward_ad.make_dual(t, tangents[1]), inputs,
                                 return_logvar=True)
        F_theta, cs_dF_dt = forward_ad.unpack_dual(F_dual)
        logvar = forward_ad.unpack_dual(logvar).primal  # its tangent (d logvar/dt) is not needed
        cs_dF_dt = cs_dF_dt.detach()
    return F_theta, logvar, cs_dF_dt  # leaving the level above freed every other tangent


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
                               scm_lambda=args.scm_lambda, cfg_scales=args.scm_cfg_scale,
                               merged_jvp=getattr(args, "merged_jvp", False))
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
