"""MeanFlowLoss against independent references: closed-form models, hand computations, finite differences."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.trigflow import FluxInputs
from model_factory import tiny_inputs, tiny_transformer
from training.meanflow import MeanFlowLoss, MeanFlowLossConfig, MeanFlowMethod, UncondEmbedding

F64 = torch.float64


# ------------------------------------------------------------------------------ closed-form models
def _bc(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1)


def student_cond(enc: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """The analytic student's conditioning scalar per row: mean T5 embedding + 0.1·guidance."""
    return enc.mean(dim=(-2, -1)) + 0.1 * guidance


def teacher_cond(pooled: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    return pooled.mean(dim=-1) + 0.05 * guidance


class AnalyticStudent(nn.Module):
    """u(z, r, t | c) = a·tanh(z)·t² + z·(t − r)² + c·t·(1 + r)   (nonlinear in z, r and t)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.3, dtype=F64))
        self.calls: list[int] = []  # batch size of every forward (the JVP counts as one)

    def forward(self, z, r, t, inputs: FluxInputs):
        self.calls.append(z.shape[0])
        c = student_cond(inputs.encoder_hidden_states, inputs.guidance)
        t, r, c = _bc(t), _bc(r), _bc(c)
        return self.a * torch.tanh(z) * t ** 2 + z * (t - r) ** 2 + c * t * (1 + r)


def analytic_u(a, z, r, t, c):
    return a * torch.tanh(z) * t ** 2 + z * (t - r) ** 2 + c * t * (1 + r)


def analytic_dudt(a, z, w, r, t, c):
    """du/dt = ∂u/∂z·w + ∂u/∂t (r fixed), derived by hand from AnalyticStudent's formula."""
    return (a * (1 - torch.tanh(z) ** 2) * w * t ** 2 + 2 * a * torch.tanh(z) * t
            + w * (t - r) ** 2 + 2 * z * (t - r) + c * (1 + r))


class AnalyticTeacher(nn.Module):
    """v_T(z, t | c) = sin(z)·(1 + t) + c."""

    def forward(self, z, t, inputs: FluxInputs):
        return torch.sin(z) * (1 + _bc(t)) + _bc(teacher_cond(inputs.pooled_projections, inputs.guidance))


def _analytic_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, ch, l, d, p = 6, 4, 3, 5, 7, 6
    x0 = torch.randn(b, n, ch, generator=g, dtype=F64)
    noise = torch.randn(b, n, ch, generator=g, dtype=F64)
    inputs = FluxInputs(torch.randn(b, l, d, generator=g, dtype=F64), torch.randn(b, p, generator=g, dtype=F64),
                        torch.zeros(l, 3), torch.zeros(n, 3), torch.tensor([4.0, 4.5, 5.0, 4.0, 4.5, 5.0], dtype=F64))
    uncond = UncondEmbedding(torch.randn(1, l, d, generator=g, dtype=F64), torch.randn(1, p, generator=g, dtype=F64))
    # Rows: inside the window [0.3, 0.8]; above it; r = t inside; dropped inside; below it; dropped, r = t.
    t = torch.tensor([0.7, 0.9, 0.5, 0.6, 0.2, 0.35], dtype=F64)
    r = torch.tensor([0.2, 0.4, 0.5, 0.1, 0.05, 0.35], dtype=F64)
    drop = torch.tensor([False, False, False, True, False, True])
    return x0, noise, inputs, uncond, t, r, drop


def _hand_target(cfg: MeanFlowLossConfig, a, x0, noise, inputs, uncond, t, r, drop):
    """Per-row loop, straight from the equations of the module docstring (linear path)."""
    targets, dudts, in_cfg = [], [], []
    for i in range(x0.shape[0]):
        gi = inputs.guidance[i]
        enc = uncond.encoder_hidden_states[0] if drop[i] else inputs.encoder_hidden_states[i]
        pooled = uncond.pooled_projections[0] if drop[i] else inputs.pooled_projections[i]
        c_s, c_t = student_cond(enc, gi), teacher_cond(pooled, gi)
        ti, ri = t[i], r[i]
        z = (1 - ti) * x0[i] + ti * noise[i]
        v = noise[i] - x0[i]
        v_teacher = torch.sin(z) * (1 + ti) + c_t
        guided = cfg.use_cfg_meanflow and cfg.cfg_min_t <= ti <= cfg.cfg_max_t and not drop[i]
        if guided:
            r_c = ti if cfg.cfg_velocity_interval == "zero" else ri
            u_c = analytic_u(a, z, r_c, ti, c_s)
            u_u = analytic_u(a, z, r_c, ti, student_cond(uncond.encoder_hidden_states[0], gi))
            velocity = cfg.cfg_omega * v_teacher + cfg.cfg_kappa * u_c + (1 - cfg.cfg_omega - cfg.cfg_kappa) * u_u
            tangent = velocity
        else:
            velocity = v_teacher
            tangent = v if cfg.jvp_velocity == "data" else v_teacher
        dudt = analytic_dudt(a, z, tangent, ri, ti, c_s)
        targets.append(velocity - (ti - ri) * dudt)
        dudts.append(dudt)
        in_cfg.append(guided)
    return torch.stack(targets), torch.stack(dudts), torch.tensor(in_cfg)


@pytest.mark.parametrize("use_cfg", [False, True])
@pytest.mark.parametrize("jvp_velocity", ["data", "teacher"])
@pytest.mark.parametrize("interval", ["zero", "interval"])
def test_target_dudt_and_loss_match_hand_computation(use_cfg, jvp_velocity, interval):
    cfg = MeanFlowLossConfig(use_cfg_meanflow=use_cfg, cfg_omega=0.8, cfg_kappa=0.5, cfg_min_t=0.3, cfg_max_t=0.8,
                             jvp_velocity=jvp_velocity, cfg_velocity_interval=interval, adaptive_p=0.5)
    x0, noise, inputs, uncond, t, r, drop = _analytic_batch()
    student, teacher = AnalyticStudent(), AnalyticTeacher()
    out = MeanFlowLoss(cfg)(student, student, teacher, x0, inputs, uncond, noise=noise, t=t, r=r, drop=drop)

    a = student.a.detach()
    target, dudt, in_cfg = _hand_target(cfg, a, x0, noise, inputs, uncond, t, r, drop)
    assert torch.equal(out.terms["cfg"], in_cfg)
    assert in_cfg.tolist() == ([True, False, True, False, False, False] if use_cfg else [False] * 6)
    torch.testing.assert_close(out.terms["dudt"], dudt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.terms["target"], target, rtol=1e-12, atol=1e-12)

    # Loss: L_i = Σ(u − u_tgt)², adaptive weight 1/(L_i + 1e-3)^p.
    z = (1 - _bc(t)) * x0 + _bc(t) * noise
    enc = torch.where(_bc(drop), uncond.encoder_hidden_states, inputs.encoder_hidden_states)
    u = analytic_u(a, z, _bc(r), _bc(t), _bc(student_cond(enc, inputs.guidance)))
    per_sample = (u - target).flatten(1).square().sum(1)
    weight = 1 / (per_sample + 1e-3) ** 0.5
    torch.testing.assert_close(out.terms["weight"], weight, rtol=1e-12, atol=0)
    assert math.isclose(out.loss.item(), (weight * per_sample).mean().item(), rel_tol=1e-12)

    # Gradient: the target is a constant (stop-grad) and so is the adaptive weight.
    out.loss.backward()
    grad = (weight * (2 * (u - target) * torch.tanh(z) * _bc(t) ** 2).flatten(1).sum(1)).mean()
    assert math.isclose(student.a.grad.item(), grad.item(), rel_tol=1e-10)

    # Passes: with CFG rows, the grad forward first (it gives u_c where h_c = t − r), one stacked forward for
    # u_∅ of the k CFG rows and the u_c it did not give, one JVP over all rows; without, JVP then grad forward.
    k = int(in_cfg.sum())
    other = int((in_cfg & (r != t)).sum()) if interval == "zero" else 0
    assert student.calls == ([6, k + other, 6] if k else [6, 6])


def test_outside_cfg_window_data_tangent_but_teacher_target():
    """jvp_velocity=data (the original): the tangent is ε − x₀, the target's velocity is v_T."""
    cfg = MeanFlowLossConfig(use_cfg_meanflow=True, cfg_min_t=0.3, cfg_max_t=0.8)
    x0, noise, inputs, uncond, t, r, drop = _analytic_batch()
    student = AnalyticStudent()
    out = MeanFlowLoss(cfg)(student, student, AnalyticTeacher(), x0, inputs, uncond, noise=noise, t=t, r=r, drop=drop)
    row = 1  # t = 0.9: outside the window
    torch.testing.assert_close(out.terms["jvp_tangent"][row], noise[row] - x0[row])
    torch.testing.assert_close(out.terms["target"][row],
                               out.terms["teacher_velocity"][row] - (t[row] - r[row]) * out.terms["dudt"][row])


@pytest.mark.parametrize("weighting", ["adaptive", "uniform"])
def test_r_equals_t_is_flow_matching_on_the_teacher(weighting):
    """Real tiny dual-time FLUX: with r = t the target is v_T and the loss is (weighted) flow matching."""
    cfg = MeanFlowLossConfig(weighting=weighting, cfg_prob=0.0)
    loss_fn = MeanFlowLoss(cfg)
    method = MeanFlowMethod(loss_fn, None, dual_time_init="copy")
    student, teacher = method.build_models(None, tiny_transformer(seed=0, timestep_scale=1.0),
                                           tiny_transformer(seed=0, timestep_scale=1.0))
    latents, inputs = tiny_inputs(batch=3)
    inputs.guidance = torch.tensor([4.0, 4.5, 5.0])
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([0.2, 0.55, 0.9])
    out = loss_fn(student, student, teacher, latents, inputs, None, noise=noise, t=t, r=t.clone(),
                  drop=torch.zeros(3, dtype=torch.bool))

    with torch.no_grad():
        z = (1 - _bc(t)) * latents + _bc(t) * noise
        v_teacher = teacher(z, t, inputs)
        u = student(z, t, t, inputs)
    assert torch.equal(out.terms["target"], v_teacher)
    per_sample = (u - v_teacher).flatten(1).square().sum(1)
    fm = (per_sample / (per_sample + 1e-3)).mean() if weighting == "adaptive" else per_sample.mean()
    assert math.isclose(out.loss.item(), fm.item(), rel_tol=1e-5)
    assert torch.all(out.terms["dudt"].abs().sum() > 0)  # the JVP ran; its term is multiplied by h = 0


def test_dudt_of_real_dual_time_flux_matches_central_differences():
    """JVP along (v, 0, 1) through FLUX with the interval embedding: t moves both timestep and t − r."""
    cfg = MeanFlowLossConfig(cfg_prob=0.0, jvp_velocity="teacher")
    loss_fn = MeanFlowLoss(cfg)
    method = MeanFlowMethod(loss_fn, None, dual_time_init="copy")
    student, teacher = method.build_models(None, tiny_transformer(seed=0, timestep_scale=1.0, dtype=F64),
                                           tiny_transformer(seed=0, timestep_scale=1.0, dtype=F64))
    latents, inputs = tiny_inputs(dtype=F64)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(latents.shape, generator=g, dtype=F64)
    t, r = torch.tensor([0.4, 0.8], dtype=F64), torch.tensor([0.1, 0.3], dtype=F64)
    out = loss_fn(student, student, teacher, latents, inputs, None, noise=noise, t=t, r=r,
                  drop=torch.zeros(2, dtype=torch.bool))
    with torch.no_grad():
        z = (1 - _bc(t)) * latents + _bc(t) * noise
        w = teacher(z, t, inputs)
        eps = 1e-2  # RoPE is float32 even in a float64 FLUX; truncation is O(eps²)
        fd = (student(z + eps * w, r, t + eps, inputs) - student(z - eps * w, r, t - eps, inputs)) / (2 * eps)
        fd_t_only = (student(z, r, t + eps, inputs) - student(z, r, t - eps, inputs)) / (2 * eps)
    rel = ((out.terms["dudt"] - fd).norm() / fd.norm()).item()
    assert rel < 1e-3, rel
    # The time tangent matters (otherwise the interval/timestep wiring could be silently dropped).
    assert fd_t_only.norm() > 0.05 * fd.norm()
    torch.testing.assert_close(out.terms["target"], w - _bc(t - r) * out.terms["dudt"])


def test_cosine_path_converts_the_linear_teacher_exactly():
    """Point-mass data x₀: the exact linear-path velocity is (z − x₀)/s; converted, it must equal the
    cosine path's own velocity (π/2)(cos a·ε − sin a·x₀), a = πt/2."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, 4, 2, generator=g, dtype=F64)
    noise = torch.randn(3, 4, 2, generator=g, dtype=F64)

    class PointMassTeacher(nn.Module):
        def forward(self, z, s, inputs):
            return (z - x0) / _bc(s)

    inputs = FluxInputs(torch.zeros(3, 2, 2, dtype=F64), torch.zeros(3, 2, dtype=F64), torch.zeros(2, 3),
                        torch.zeros(4, 3), torch.full((3,), 4.0, dtype=F64))
    t = torch.tensor([0.15, 0.5, 0.95], dtype=F64)
    student = AnalyticStudent()
    out = MeanFlowLoss(MeanFlowLossConfig(path_type="cosine", cfg_prob=0.0))(
        student, student, PointMassTeacher(), x0, inputs, None, noise=noise, t=t, r=t * 0.5,
        drop=torch.zeros(3, dtype=torch.bool))
    a = _bc(t) * math.pi / 2
    expected = (math.pi / 2) * (torch.cos(a) * noise - torch.sin(a) * x0)
    torch.testing.assert_close(out.terms["teacher_velocity"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.terms["jvp_tangent"], expected, rtol=1e-12, atol=1e-12)  # data velocity = same


def test_time_sampler_statistics():
    torch.manual_seed(0)
    n = 200_000
    loss = MeanFlowLoss(MeanFlowLossConfig(time_sampler="logit_normal", time_mu=-0.4, time_sigma=1.0,
                                           ratio_r_not_equal_t=0.75))
    r, t = loss.sample_times(n, "cpu")
    assert torch.all(r <= t) and torch.all((t > 0) & (t < 1))
    equal = r == t
    assert abs(equal.float().mean().item() - 0.25) < 0.005
    # t = max and r = min of two N(μ, σ²) in logit space: means μ ± σ/√π, std σ·√(1 − 1/π).
    logit = lambda x: torch.log(x / (1 - x))
    lt, lr = logit(t[~equal].double()), logit(r[~equal].double())
    assert abs(lt.mean().item() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.01
    assert abs(lr.mean().item() - (-0.4 - 1 / math.sqrt(math.pi))) < 0.01
    assert abs(lt.std().item() - math.sqrt(1 - 1 / math.pi)) < 0.01
    # The r = t rows keep t = max of the pair (not a fresh draw).
    assert abs(logit(t[equal].double()).mean().item() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.02

    r, t = MeanFlowLoss(MeanFlowLossConfig(time_sampler="uniform", ratio_r_not_equal_t=1.0)).sample_times(n, "cpu")
    assert torch.all(r < t)
    assert abs(t.mean().item() - 2 / 3) < 0.005 and abs(r.mean().item() - 1 / 3) < 0.005
    r, t = MeanFlowLoss(MeanFlowLossConfig(ratio_r_not_equal_t=0.0)).sample_times(1000, "cpu")
    assert torch.equal(r, t)
    drop = MeanFlowLoss(MeanFlowLossConfig(cfg_prob=0.1)).sample_drop(n, "cpu")
    assert abs(drop.float().mean().item() - 0.1) < 0.005


def test_sampled_draws_are_used_consistently():
    """Without injected draws: r ≤ t, dropped rows see the " " embedding, guidance from cfg_scales."""
    torch.manual_seed(3)
    cfg = MeanFlowLossConfig(cfg_prob=0.5, use_cfg_meanflow=True, cfg_scales=(2.0, 7.0))
    x0, noise, inputs, uncond, *_ = _analytic_batch()
    inputs.guidance = None
    student = AnalyticStudent()
    out = MeanFlowLoss(cfg)(student, student, AnalyticTeacher(), x0, inputs, uncond)
    terms = out.terms
    assert torch.all(terms["r"] <= terms["t"])
    assert set(terms["guidance"].tolist()) <= {2.0, 7.0}
    assert not torch.any(terms["cfg"] & terms["drop"])
    # Recompute v_T row by row with the prompt each row should have seen.
    for i in range(6):
        pooled = uncond.pooled_projections[0] if terms["drop"][i] else inputs.pooled_projections[i]
        expected = torch.sin(terms["z_t"][i]) * (1 + terms["t"][i]) + teacher_cond(pooled, terms["guidance"][i])
        torch.testing.assert_close(terms["teacher_velocity"][i], expected, rtol=1e-12, atol=1e-12)
    assert 0 < int(terms["drop"].sum()) < 6  # seed 3 drops some rows, keeps others


def test_zero_init_student_reproduces_teacher_and_copy_init_copies_embedder():
    latents, inputs = tiny_inputs()
    t, r = torch.tensor([0.3, 0.9]), torch.tensor([0.1, 0.2])
    loss = MeanFlowLoss(MeanFlowLossConfig())
    student, teacher = MeanFlowMethod(loss, None, "zero").build_models(None, tiny_transformer(seed=0),
                                                                        tiny_transformer(seed=0))
    with torch.no_grad():
        assert torch.equal(student(latents, r, t, inputs), teacher(latents, t, inputs))

    student, teacher = MeanFlowMethod(loss, None, "copy").build_models(None, tiny_transformer(seed=0),
                                                                        tiny_transformer(seed=0))
    emb2 = student.transformer.time_text_embed.interval_embedder.state_dict()
    ref = teacher.transformer.time_text_embed.timestep_embedder.state_dict()
    assert emb2.keys() == ref.keys()
    assert all(torch.equal(emb2[k], ref[k]) for k in ref)
    assert emb2["linear_1.weight"].data_ptr() != ref["linear_1.weight"].data_ptr()  # a copy, not shared
    with torch.no_grad():
        u = student(latents, r, t, inputs)
        assert not torch.allclose(u, teacher(latents, t, inputs))
        # u(z, r, t) is FLUX at timestep t with interval t − r (not r, not t).
        direct = student.transformer(latents, timestep=t, interval=t - r, **inputs.kwargs(torch.float32))[0]
        assert torch.equal(u, direct)
    state, config = MeanFlowMethod(loss, None).export_state_dict(student)
    assert config["interval_embedding"] is True
    assert {"time_text_embed.interval_embedder.linear_1.weight",
            "time_text_embed.interval_embedder.linear_2.bias"} <= set(state)


def test_bad_config_values_raise_and_omega_plus_kappa_warns():
    bad = [dict(ratio_r_not_equal_t=1.5), dict(cfg_prob=-0.1), dict(cfg_min_t=0.8, cfg_max_t=0.3),
           dict(cfg_kappa=1.0), dict(cfg_omega=0.0), dict(time_sigma=0.0), dict(path_type="sine")]
    for kwargs in bad:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            MeanFlowLoss(MeanFlowLossConfig(**kwargs))
    warnings = MeanFlowLossConfig(use_cfg_meanflow=True, cfg_omega=1.0, cfg_kappa=0.5).validate()
    assert any("omega/(1-kappa) = 2" in w for w in warnings)
    assert MeanFlowLossConfig(use_cfg_meanflow=True, cfg_omega=0.5, cfg_kappa=0.5).validate() == []
