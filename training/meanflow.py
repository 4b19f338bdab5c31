"""MeanFlow distillation of a FLUX flow teacher into a dual-time (r, t) student (T2I-Distill's recipe).

Notation (flow convention of the whole code base, t = 1 is noise):
    x₀  packed data latents (VAE − shift)·scale — no σ_d here, unlike sCM;   ε ~ N(0, I)
    path ``linear``:  z_t = (1 − t)·x₀ + t·ε,                 v = dz_t/dt = ε − x₀
    path ``cosine``:  z_t = cos(πt/2)·x₀ + sin(πt/2)·ε,      v = (π/2)·(cos(πt/2)·ε − sin(πt/2)·x₀)
    u_θ(z, r, t)  the student's average velocity over [r, t]; FLUX is called with
                  ``timestep = t`` and ``interval = h = t − r`` (second, dual-time embedder)
    v_T(z, t)     the frozen teacher's instantaneous velocity (plain FLUX, no interval)

MeanFlow identity (Geng et al. 2025): (t − r)·u(z_t, r, t) = ∫_r^t v(z_τ, τ) dτ, differentiated in t:
    u(z_t, r, t) = v(z_t, t) − (t − r)·du/dt,      du/dt = ∂_z u · v + ∂_t u
i.e. du/dt is ONE Jacobian-vector product of u_θ at (z_t, r, t) with tangents (v, 0, 1).

Per sample i of a batch:
    (a, b) ~ p_time twice;  t = max(a, b),  r = min(a, b)                              (time sampler)
        p_time = ``uniform``: U(0, 1);  ``logit_normal``: sigmoid(N(time_mu, time_sigma²))
    with probability 1 − ratio_r_not_equal_t: r ← t        (0.75 → 25 % of the rows are flow matching)
    w ~ Uniform(cfg_scales)                          (distilled-guidance embedding, teacher and student)
    d ~ Bernoulli(cfg_prob): the prompt embeddings (T5 tokens + CLIP pooled) become those of " "
                                                                                         (label dropout)
    v_T = teacher(z_t, t | c, w)                     (on the dropped-or-not prompt c; replaces ε − x₀)
    CFG row  ⇔  use_cfg_meanflow ∧ cfg_min_t ≤ t ≤ cfg_max_t ∧ ¬d
        u_c = u_θ(z_t, t − h_c, t | c, w),  u_∅ = u_θ(z_t, t − h_c, t | " ", w)      (no grad)
              h_c = t − r (``cfg_velocity_interval=interval``, the release) or h_c = 0 (``zero``)
        ṽ = ω·v_T + κ·u_c + (1 − ω − κ)·u_∅                                  (improved CFG, ω, κ)
        tangent = ṽ,  velocity in the target = ṽ
    other rows (outside the window, dropped rows, or CFG off)
        tangent = v (``jvp_velocity=data``, the original) or v_T (``jvp_velocity=teacher``)
        velocity in the target = v_T
    (_, du/dt) = JVP of u_θ(·, ·, · | c, w) at (z_t, r, t) along (tangent, 0, 1)       (no grad)
    u_tgt = stopgrad(velocity − (t − r)·du/dt)
    L_i = Σ_elements (u_θ(z_t, r, t | c, w) − u_tgt)²
    loss = mean_i L_i / (stopgrad(L_i) + 1e-3)^p,  p = adaptive_p   (``weighting=adaptive``)
           mean_i L_i                                             (``weighting=uniform``)
With r = t the correction vanishes and the loss is (weighted) flow matching onto the teacher.

Choices and deviations from the original release (all documented at the flags):
* ``cfg_velocity_interval`` defaults to ``interval``, the release: u_c, u_∅ are evaluated at the row's
  own interval h = t − r.  ``zero`` (h_c = 0) is the MeanFlow paper's form (App. B and its official
  code): ṽ is the JVP tangent dz/dt and the velocity of the MeanFlow identity, an *instantaneous*
  velocity field, and ω·v_T already is one; u_θ(z, t, t) is the student's instantaneous velocity,
  u_θ(z, r, t) an average over [r, t] — a different quantity.  With h_c = 0 the guided target's fixed
  point is the classic CFG field with scale ω' = ω/(1 − κ) (solve ṽ = ω·v + κ·ṽ + (1 − ω − κ)·v_∅ for ṽ);
  with h_c = t − r that holds only where r = t.
* ``jvp_velocity`` defaults to ``data`` (the release): outside the CFG window the JVP tangent is the
  noisy data velocity ε − x₀ while the target uses v_T (u_tgt = v_T − h·du/dt) — the tangent and the
  identity's velocity disagree.  ``teacher`` uses v_T for both, consistent with the CFG rows (which
  use ṽ for both in either mode).
* ``cosine`` path: the teacher is a *linear*-path flow model, so its velocity is converted instead of
  used as is (the release feeds z_t, t of the cosine path straight into the linear teacher).  With
  a = πt/2, n = cos a + sin a, s = sin a / n the cosine point is n·(a linear point at time s):
      x̂₀ = z/n − s·v_T(z/n, s),  ε̂ = z/n + (1 − s)·v_T(z/n, s)
      v_cos = (π/2)·(cos a·ε̂ − sin a·x̂₀) = (π/2)·[(cos a − sin a)·z + v_T(z/n, s)] / n
* label dropout uses ``cfg_prob`` (the flag) and applies whether or not CFG MeanFlow is on, as in
  the release; it keeps the student's " " branch trained for u_∅ and for sampling with CFG.
* times, targets and the loss are float32 (the release drew times in bf16).

Passes per step (merged where the maths allows; the release runs a separate JVP for the CFG and the
non-CFG rows, and its CFG pass is a second student forward):
    1 teacher forward (B rows) → v_T
    1 student forward with grad (B rows) through the possibly DDP/DeepSpeed-wrapped model → u_θ
      (first when there are CFG rows: on them u_θ(z_t, r, t | c) is u_c wherever h_c = t − r)
    1 no-grad student forward on B_cfg + B_other rows (" " of every CFG row, and c of the CFG rows whose
      h_c ≠ t − r: none with ``interval``, those with r < t with ``zero``) → u_∅, the missing u_c
    1 no-grad JVP over all B rows, per-row tangents (ṽ on CFG rows, v or v_T elsewhere) → du/dt
Without CFG rows the gradient pass runs last, after the JVP, so the JVP's working set is freed before
the gradient pass's activations are kept.
The JVP runs on the unwrapped student (``torch.func.jvp`` cannot go through DDP); gradient
checkpointing is inactive there by itself (diffusers only checkpoints when grad is enabled).
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from model.attention import set_jvp_attention
from model.trigflow import FluxInputs, flow_velocity
from training.common import LossOutput, per_sample_sq_norm, sample_guidance

logger = logging.getLogger("t2i_distill")

PATH_TYPES = ("linear", "cosine")
TIME_SAMPLERS = ("uniform", "logit_normal")
WEIGHTINGS = ("adaptive", "uniform")
JVP_VELOCITIES = ("data", "teacher")
CFG_VELOCITY_INTERVALS = ("interval", "zero")
DUAL_TIME_INITS = ("copy", "zero")
ADAPTIVE_C = 1e-3  # c in L / (L + c)^p, as MeanFlow and the release


@dataclass
class MeanFlowLossConfig:
    """Hyper-parameters of :class:`MeanFlowLoss` (names = the command-line flags)."""

    path_type: str = "linear"
    time_sampler: str = "logit_normal"
    time_mu: float = -0.4
    time_sigma: float = 1.0
    ratio_r_not_equal_t: float = 0.75
    weighting: str = "adaptive"
    adaptive_p: float = 1.0
    cfg_scales: tuple[float, ...] = (4.0, 4.5, 5.0)
    cfg_prob: float = 0.1
    use_cfg_meanflow: bool = False
    cfg_omega: float = 1.0
    cfg_kappa: float = 0.0
    cfg_min_t: float = 0.0
    cfg_max_t: float = 1.0
    jvp_velocity: str = "data"
    cfg_velocity_interval: str = "interval"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MeanFlowLossConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name != "cfg_scales"}
        return cls(cfg_scales=tuple(args.cfg_scale), **values)

    @property
    def effective_guidance(self) -> float:
        """ω' = ω / (1 − κ): the CFG scale the guided target converges to (u_c → ṽ at the fixed point)."""
        return self.cfg_omega / (1.0 - self.cfg_kappa)

    def validate(self) -> list[str]:
        """Raise ValueError on unusable values; return warnings (strings) for legal but unusual ones."""
        choices = {"path_type": PATH_TYPES, "time_sampler": TIME_SAMPLERS, "weighting": WEIGHTINGS,
                   "jvp_velocity": JVP_VELOCITIES, "cfg_velocity_interval": CFG_VELOCITY_INTERVALS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.ratio_r_not_equal_t <= 1.0:
            raise ValueError(f"--ratio_r_not_equal_t {self.ratio_r_not_equal_t:g} must be in [0, 1]: it is the "
                             "fraction of rows with r < t (0.75 → 25 % flow-matching rows with r = t)")
        if not 0.0 <= self.cfg_prob <= 1.0:
            raise ValueError(f"--cfg_prob {self.cfg_prob:g} must be in [0, 1]: it is the probability of replacing "
                             "a prompt by \" \" (label dropout)")
        if self.time_sigma <= 0:
            raise ValueError(f"--time_sigma {self.time_sigma:g} must be > 0 (std of the logit-normal time sampler)")
        if not self.cfg_scales:
            raise ValueError("--cfg_scale needs at least one guidance scale, e.g. 4,4.5,5")
        if self.cfg_min_t > self.cfg_max_t:
            raise ValueError(f"--cfg_min_t {self.cfg_min_t:g} > --cfg_max_t {self.cfg_max_t:g}: the CFG time window "
                             "would be empty. Swap them (e.g. --cfg_min_t 0.3 --cfg_max_t 0.8)")
        if not 0.0 <= self.cfg_kappa < 1.0:
            raise ValueError(f"--cfg_kappa {self.cfg_kappa:g} must be in [0, 1): the effective guidance scale is "
                             "cfg_omega / (1 - cfg_kappa), undefined or negative for kappa >= 1")
        if self.cfg_omega <= 0:
            raise ValueError(f"--cfg_omega {self.cfg_omega:g} must be > 0: it is the teacher's share of the guided "
                             "target (0 leaves only the student's own predictions in it)")
        warnings = []
        if self.use_cfg_meanflow:
            if self.cfg_max_t < 0.0 or self.cfg_min_t > 1.0:
                warnings.append(f"the CFG window [{self.cfg_min_t:g}, {self.cfg_max_t:g}] misses t in [0, 1]: "
                                "no row will use the guided target")
            if self.cfg_omega + self.cfg_kappa > 1.0:
                # Legal: 1 − ω − κ < 0 is ordinary CFG extrapolation (the README's ω=1, κ=0.5 gives ω'=2).
                warnings.append(f"cfg_omega + cfg_kappa = {self.cfg_omega + self.cfg_kappa:g} > 1: the target "
                                f"extrapolates away from the unconditional velocity with effective scale "
                                f"omega/(1-kappa) = {self.effective_guidance:g} (at the fixed point; exact where "
                                "h = 0, i.e. --cfg_velocity_interval zero or r = t), on top of the teacher's "
                                "guidance embedding (--cfg_scale)")
            if self.cfg_prob == 0.0:
                warnings.append("--cfg_prob 0 with CFG MeanFlow: the unconditional branch u(.|\" \") is never trained")
        return warnings


@dataclass
class UncondEmbedding:
    """Prompt embeddings of " " (the unconditional prompt), computed once through the real encoders."""

    encoder_hidden_states: torch.Tensor  # [1, L, joint_attention_dim]
    pooled_projections: torch.Tensor  # [1, pooled_projection_dim]

    def to(self, device: torch.device | str) -> "UncondEmbedding":
        return UncondEmbedding(self.encoder_hidden_states.to(device), self.pooled_projections.to(device))


def encode_unconditional(conditioner) -> UncondEmbedding:
    """Embeddings of " " from the run's own CLIP + T5 (same encoders and precision as the captions)."""
    prompt_embeds, pooled, _ = conditioner.encode_prompts([" "])
    return UncondEmbedding(prompt_embeds.detach().float().cpu(), pooled.detach().float().cpu())


def path_coefficients(path_type: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(α, σ, α', σ') with z_t = α·x₀ + σ·ε and v = α'·x₀ + σ'·ε (see module doc)."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        a = t * (math.pi / 2)
        return torch.cos(a), torch.sin(a), -(math.pi / 2) * torch.sin(a), (math.pi / 2) * torch.cos(a)
    raise ValueError(f"unknown path_type {path_type!r}; choose from {PATH_TYPES}")


def teacher_velocity(path_type: str, teacher: nn.Module, z: torch.Tensor, t: torch.Tensor,
                     inputs: FluxInputs) -> torch.Tensor:
    """v_T on the chosen path from a linear-path flow teacher ``teacher(z, s, inputs)`` (module doc)."""
    if path_type == "linear":
        return teacher(z, t, inputs)
    a = t * (math.pi / 2)
    cos_a, sin_a = torch.cos(a), torch.sin(a)
    n = cos_a + sin_a
    s = sin_a / n
    nb, cb, sb = (x.reshape(-1, *([1] * (z.ndim - 1))) for x in (n, cos_a, sin_a))
    v_lin = teacher(z / nb, s, inputs)
    # −sin a·x̂₀ + cos a·ε̂ = (cos a − sin a)·z/n + (sin a·s + cos a·(1 − s))·v, and the last factor is 1/n.
    return (math.pi / 2) * ((cb - sb) * z + v_lin) / nb


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class MeanFlowLoss:
    """The MeanFlow distillation loss; every equation is in the module docstring.

    ``__call__`` accepts the random draws (``t``, ``r``, ``noise``, ``drop``; the guidance scale through
    ``inputs.guidance``) so tests are deterministic; whatever is not given is sampled from the global
    torch RNG (which the training core seeds per rank and checkpoints).
    """

    def __init__(self, config: MeanFlowLossConfig):
        config.validate()
        self.config = config

    # ----------------------------------------------------------------------------------- sampling
    def sample_times(self, batch: int, device: torch.device | str,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t), r ≤ t, with r = t on a random 1 − ratio_r_not_equal_t share of the rows."""
        c = self.config
        if c.time_sampler == "uniform":
            pair = torch.rand(batch, 2, device=device, dtype=dtype)
        else:
            pair = torch.sigmoid(torch.randn(batch, 2, device=device, dtype=dtype) * c.time_sigma + c.time_mu)
        pair, _ = torch.sort(pair, dim=1)
        r, t = pair[:, 0], pair[:, 1]
        equal = torch.rand(batch, device=device) < (1.0 - c.ratio_r_not_equal_t)
        return torch.where(equal, t, r), t

    def sample_drop(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.rand(batch, device=device) < self.config.cfg_prob

    def cfg_rows(self, t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Rows trained on the guided target: CFG on, t inside [cfg_min_t, cfg_max_t], prompt kept."""
        c = self.config
        if not c.use_cfg_meanflow:
            return torch.zeros_like(drop)
        return (t >= c.cfg_min_t) & (t <= c.cfg_max_t) & ~drop

    # ------------------------------------------------------------------------------------ the loss
    def __call__(self, student: nn.Module, student_for_jvp: nn.Module, teacher: nn.Module,
                 x0_latents: torch.Tensor, inputs: FluxInputs, uncond: UncondEmbedding | None,
                 noise: torch.Tensor | None = None, t: torch.Tensor | None = None, r: torch.Tensor | None = None,
                 drop: torch.Tensor | None = None) -> LossOutput:
        """One MeanFlow loss evaluation.

        ``student(z, r, t, inputs)`` → u (float), called with grad (may be DDP/DeepSpeed-wrapped);
        ``student_for_jvp``: the same model unwrapped (no-grad CFG pass and JVP);
        ``teacher(z, t, inputs)`` → v_T (linear-path flow velocity);
        ``x0_latents``: packed (VAE − shift)·scale latents [B, N, C];
        ``uncond``: embeddings of " " (needed when ``cfg_prob`` > 0 or CFG MeanFlow is on).
        """
        c = self.config
        device = x0_latents.device
        dtype = torch.promote_types(x0_latents.dtype, torch.float32)  # float32 (float64 in tests)
        x0 = x0_latents.to(dtype)
        b = x0.shape[0]
        if (t is None) != (r is None):
            raise ValueError("pass both `t` and `r` (or neither, to sample them)")
        if t is None:
            r, t = self.sample_times(b, device, dtype)
        t, r = t.to(device, dtype).reshape(b), r.to(device, dtype).reshape(b)
        if bool((r > t).any()):
            raise ValueError("MeanFlow needs r <= t for every sample")
        if noise is None:
            noise = torch.randn_like(x0)
        noise = noise.to(dtype)
        if drop is None:
            drop = self.sample_drop(b, device)
        drop = drop.to(device=device, dtype=torch.bool).reshape(b)
        guidance = inputs.guidance if inputs.guidance is not None else sample_guidance(b, c.cfg_scales, device)
        cond = self._drop_prompts(replace(inputs, guidance=guidance), drop, uncond)
        cfg = self.cfg_rows(t, drop)

        alpha, sigma, d_alpha, d_sigma = (_bcast(x, x0) for x in path_coefficients(c.path_type, t))
        z_t = alpha * x0 + sigma * noise
        v_data = d_alpha * x0 + d_sigma * noise
        h = t - r

        with torch.no_grad():
            v_teacher = teacher_velocity(c.path_type, teacher, z_t, t, cond).to(dtype)
        any_cfg = bool(cfg.any())
        # With CFG rows the gradient pass goes first: its value u_θ(z_t, r, t | c) is u_c wherever the CFG
        # pass would evaluate the student at the row's own interval, so those rows skip that pass.
        u = student(z_t, r, t, cond).to(dtype) if any_cfg else None
        with torch.no_grad():
            tangent = (v_data if c.jvp_velocity == "data" else v_teacher).clone()
            velocity = v_teacher.clone()
            if any_cfg:
                idx = cfg.nonzero().reshape(-1)
                v_tilde = self._guided_velocity(student_for_jvp, z_t[idx], r[idx], t[idx], v_teacher[idx],
                                                cond.select(idx), uncond, u.detach()[idx])
                tangent[idx] = v_tilde
                velocity[idx] = v_tilde
            # One JVP for every row: d/dt u(z_t, r, t) along (tangent, 0, 1); interval = t − r inside.
            u_primal, dudt = torch.func.jvp(lambda z, rr, tt: student_for_jvp(z, rr, tt, cond), (z_t, r, t),
                                            (tangent, torch.zeros_like(r), torch.ones_like(t)))
            dudt = dudt.to(dtype)
            u_target = velocity - _bcast(h, x0) * dudt

        if u is None:  # without CFG rows the JVP ran first, so its working set never meets the graph's
            u = student(z_t, r, t, cond).to(dtype)
        per_sample = per_sample_sq_norm(u - u_target)  # L_i = Σ (u − u_tgt)²
        if c.weighting == "adaptive":
            weight = 1.0 / (per_sample.detach() + ADAPTIVE_C).pow(c.adaptive_p)
        else:
            weight = torch.ones_like(per_sample)
        loss = (weight * per_sample).mean()

        logs = {"loss": loss.item(), "loss_mean_ref": (u - u_target).detach().square().mean().item(),
                "sq_err": per_sample.detach().mean().item(), "dudt_rms": dudt.square().mean().sqrt().item(),
                "frac_r_eq_t": (r == t).float().mean().item(), "frac_cfg": cfg.float().mean().item(),
                "frac_dropped": drop.float().mean().item(), "mean_interval": h.mean().item(),
                "adaptive_weight": weight.mean().item(), "tangent_rms": tangent.square().mean().sqrt().item()}
        terms = {"z_t": z_t, "teacher_velocity": v_teacher, "jvp_tangent": tangent, "dudt": dudt, "target": u_target,
                 "student_output": u.detach(), "jvp_primal": u_primal.to(dtype), "weight": weight,
                 "t": t, "r": r, "drop": drop, "cfg": cfg, "guidance": guidance}
        return LossOutput(loss, logs, terms)

    def _drop_prompts(self, inputs: FluxInputs, drop: torch.Tensor, uncond: UncondEmbedding | None) -> FluxInputs:
        """Replace the prompt embeddings of the dropped rows by those of " "."""
        need_uncond = bool(drop.any()) or self.config.use_cfg_meanflow
        if uncond is None:
            if need_uncond:
                raise ValueError("label dropout / CFG MeanFlow need the embeddings of \" \" (`uncond`)")
            return inputs
        if uncond.encoder_hidden_states.shape[1:] != inputs.encoder_hidden_states.shape[1:]:
            raise ValueError(f"the \" \" embedding has shape {tuple(uncond.encoder_hidden_states.shape[1:])} but the "
                             f"prompts have {tuple(inputs.encoder_hidden_states.shape[1:])}: encode both with the same "
                             "--max_sequence_length")
        if not bool(drop.any()):
            return inputs
        enc = torch.where(drop.reshape(-1, 1, 1), uncond.encoder_hidden_states.to(inputs.encoder_hidden_states),
                          inputs.encoder_hidden_states)
        pooled = torch.where(drop.reshape(-1, 1), uncond.pooled_projections.to(inputs.pooled_projections),
                             inputs.pooled_projections)
        return replace(inputs, encoder_hidden_states=enc, pooled_projections=pooled)

    def _guided_velocity(self, student: nn.Module, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                         v_teacher: torch.Tensor, cond: FluxInputs, uncond: UncondEmbedding,
                         u_own: torch.Tensor) -> torch.Tensor:
        """ṽ = ω·v_T + κ·u_c + (1 − ω − κ)·u_∅ on k CFG rows, with the missing u_c and every u_∅ from ONE
        stacked student pass.

        ``u_own`` = u_θ(z, r, t | c), the gradient pass's value on these rows: it *is* u_c on the rows where
        the CFG interval h_c equals t − r (every row with ``interval``, the rows with r = t with ``zero``),
        so only the other rows' u_c are computed (k + #other rows instead of 2k).
        """
        c = self.config
        k = z.shape[0]
        r_eval = t if c.cfg_velocity_interval == "zero" else r  # h_c = 0 or t − r
        need = (r_eval != r).nonzero().reshape(-1)  # rows whose u_c is not u_own
        rows = torch.cat([need, torch.arange(k, device=z.device)])  # [u_c rows | u_∅ rows]
        enc = torch.cat([cond.encoder_hidden_states[need],
                         uncond.encoder_hidden_states.to(cond.encoder_hidden_states).expand(k, -1, -1)])
        pooled = torch.cat([cond.pooled_projections[need],
                            uncond.pooled_projections.to(cond.pooled_projections).expand(k, -1)])
        stacked = FluxInputs(enc, pooled, cond.txt_ids, cond.img_ids, None if cond.guidance is None else cond.guidance[rows])
        u_both = student(z[rows], r_eval[rows], t[rows], stacked).to(v_teacher.dtype)
        u_cond = u_own.to(v_teacher.dtype).clone()
        u_cond[need] = u_both[:need.numel()]
        u_uncond = u_both[need.numel():]
        return c.cfg_omega * v_teacher + c.cfg_kappa * u_cond + (1.0 - c.cfg_omega - c.cfg_kappa) * u_uncond


class MeanFlowStudent(nn.Module):
    """u_θ(z, r, t) = FLUX(z, timestep=t, interval=t − r), float32 out (the dual-time student)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, inputs: FluxInputs) -> torch.Tensor:
        t, r = t.reshape(-1), r.reshape(-1)
        return flow_velocity(self.transformer, z, t, inputs, interval=t - r)


class FlowTeacher(nn.Module):
    """v_T(z, t) = FLUX(z, timestep=t), float32 out (the plain flow-matching teacher)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, z: torch.Tensor, t: torch.Tensor, inputs: FluxInputs) -> torch.Tensor:
        return flow_velocity(self.transformer, z, t.reshape(-1), inputs)


class MeanFlowMethod:
    """MeanFlow on the shared core (``training.core.DistillMethod``): dual-time student, flow teacher."""

    name = "MeanFlow"

    def __init__(self, loss: MeanFlowLoss, uncond: UncondEmbedding | None, dual_time_init: str = "copy",
                 jvp_attention: str = "auto"):
        if dual_time_init not in DUAL_TIME_INITS:
            raise ValueError(f"--dual_time_init {dual_time_init!r} is not one of {', '.join(DUAL_TIME_INITS)}")
        self.loss_fn = loss
        self.uncond = uncond
        self.dual_time_init = dual_time_init
        self.jvp_attention = jvp_attention

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MeanFlowMethod":
        """Build from the parsed flags; " " is encoded in :meth:`setup` by the training core."""
        return cls(MeanFlowLoss(MeanFlowLossConfig.from_args(args)), None, args.dual_time_init, args.jvp_attention)

    def setup(self, conditioner) -> None:
        """Encode the unconditional prompt " " once with the run's text encoders (core hook)."""
        self.uncond = encode_unconditional(conditioner)

    def build_models(self, args: argparse.Namespace, teacher: nn.Module, student: nn.Module) -> tuple[nn.Module, nn.Module]:
        if teacher.time_text_embed.interval_embedder is not None:
            raise ValueError("the teacher weights carry an interval (t - r) embedder: --rescaled_checkpoint_path "
                             "looks like a MeanFlow student. Pass the (rescaled) flow-matching teacher instead.")
        if student.time_text_embed.interval_embedder is not None:
            logger.info("the student weights already carry an interval embedder; --dual_time_init %s is not applied",
                        self.dual_time_init)
        student.enable_interval_embedding(self.dual_time_init)  # no-op when present
        set_jvp_attention(student, self.jvp_attention)  # only the student goes through a JVP
        return MeanFlowStudent(student), FlowTeacher(teacher)

    def loss(self, student: nn.Module, student_unwrapped: nn.Module, teacher: nn.Module, latents: torch.Tensor,
             inputs: FluxInputs, step: int) -> LossOutput:
        if self.uncond is not None and self.uncond.encoder_hidden_states.device != latents.device:
            self.uncond = self.uncond.to(latents.device)  # moved once, on first use
        return self.loss_fn(student, student_unwrapped, teacher, latents, inputs, self.uncond)

    def export_state_dict(self, student: MeanFlowStudent) -> tuple[dict, dict]:
        """The transformer's own state dict (incl. ``time_text_embed.interval_embedder.*``) and config."""
        return dict(student.transformer.state_dict()), dict(student.transformer.config)
