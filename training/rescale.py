"""Teacher rescaling: adapt a stock FLUX (time inputs ×1000) to time inputs in [0, 1] (×1).

Why: stock FLUX embeds sin/cos(1000·t·ω_k).  The JVPs of sCM and MeanFlow carry a time tangent, and
d/dt of that embedding is 1000·ω_k·cos(1000·t·ω_k): the factor 1000 multiplies every time tangent and
makes the distillation diverge (the paper's first guideline).  A model fed t ∈ [0, 1] has no such factor,
but the stock weights do not know that input range, so they are adapted by a short fine-tune.

Models (same architecture, both initialised from the stock weights):
    teacher  v_T(z, t, g) = FLUX_stock(z, 1000·t, 1000·g)         frozen, ``timestep_scale`` 1000
    student  v_θ(z, t, g) = FLUX_θ(z, t, g)                        trained, ``timestep_scale`` 1
At step 0 the two differ only through the argument of the sinusoidal time/guidance embeddings.
Timestep *and* guidance are rescaled ("timesteps scaled in proportion"; the release's class name
``...TimestepX1GuidanceX1`` says guidance too).  Callers pass the same t ∈ [0, 1] and g to both.

Flow path (the project convention): z_t = (1 − t)·x₀ + t·ε, velocity v = ε − x₀, t = 1 is noise.

Objectives (per sample; ``ℓ`` is smooth-L1 with threshold β or the squared error, averaged over
latent elements):
    self_distill   L = ℓ(v_θ(z_t, t, g), stopgrad v_T(z_t, t, g))       (the paper, §2.1: smooth L1)
    flow_matching  L = ℓ(v_θ(z_t, t, g), ε − x₀)                        (the teacher's own pre-training loss)
smooth_l1(d) = 0.5·d²/β if |d| < β else |d| − 0.5·β  (PyTorch's ``smooth_l1_loss``; β = 1 by default).

Time proposal t (``time_sampling``):
    logit_normal  t = sigmoid(m + s·n), n ~ N(0, 1)                  (SD3's proposal)
    flux_shift    t = sigmoid(m + μ(N) + s·n)                        (the same, shifted as FLUX samples)
    uniform       t ~ U(0, 1)
with μ(N) = base_shift + (max_shift − base_shift)·(N − base_seq_len)/(max_seq_len − base_seq_len) for N
image tokens (diffusers' ``calculate_shift``).  ``flux_shift`` equals FLUX's shift applied to a
logit-normal sample: e^μ/(e^μ + 1/t − 1) = sigmoid(μ + logit t).  It is the default: it is the time
distribution FLUX itself is trained and sampled at, and at 512² (μ ≈ 0.63) it still covers the whole
interval where the students later query the teacher.
Guidance g ~ U(guidance_min, guidance_max) per sample (default [1, 6], covering 3.5 used at inference
and {4, 4.5, 5} used by the students' training), when the model has a guidance embedding.

``flow_matching`` and guidance-distilled teachers (FLUX.1-dev/lite): the data velocity ε − x₀ is the
*conditional* velocity, i.e. guidance-1 behaviour.  Regressing every guidance value onto it teaches the
×1 guidance embedding that guidance does nothing — the guidance distillation is lost.  Use it for
teachers without a guidance embedding; ``self_distill`` has no such problem (the stock model supplies
the guided velocity for every g).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.transformer import STOCK_TIMESTEP_SCALE, DistillFluxTransformer2DModel
from model.trigflow import FluxInputs, flow_velocity
from training.common import LossOutput, TrainingError, per_sample_sq_norm

logger = logging.getLogger("t2i_distill")

OBJECTIVES = ("self_distill", "flow_matching")
LOSSES = ("smooth_l1", "mse")
TIME_SAMPLINGS = ("flux_shift", "logit_normal", "uniform")
RESCALED_TIMESTEP_SCALE = 1.0
RESCALED_PT = "rescaled.pt"
RESCALED_FOLDER = "rescaled_transformer"


@dataclass
class ShiftSchedule:
    """FLUX's resolution-dependent shift μ(N) (FlowMatchEulerDiscreteScheduler config of FLUX.1-dev)."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def mu(self, image_seq_len: int) -> float:
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return image_seq_len * m + self.base_shift - m * self.base_seq_len

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "ShiftSchedule":
        default = cls()
        return cls(int(config.get("base_image_seq_len", default.base_seq_len)),
                   int(config.get("max_image_seq_len", default.max_seq_len)),
                   float(config.get("base_shift", default.base_shift)),
                   float(config.get("max_shift", default.max_shift)))


@dataclass
class RescaleLossConfig:
    objective: str = "self_distill"
    loss: str = "smooth_l1"
    smooth_l1_beta: float = 1.0
    time_sampling: str = "flux_shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    guidance_min: float = 1.0
    guidance_max: float = 6.0
    shift: ShiftSchedule = None  # type: ignore[assignment]  # default set in __post_init__

    def __post_init__(self):
        if self.shift is None:
            self.shift = ShiftSchedule()
        for name, value, allowed in (("objective", self.objective, OBJECTIVES), ("loss", self.loss, LOSSES),
                                     ("time_sampling", self.time_sampling, TIME_SAMPLINGS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.smooth_l1_beta <= 0 or self.logit_std <= 0:
            raise ValueError("smooth_l1_beta and logit_std must be > 0")
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 0 <= guidance_min <= guidance_max, got [{self.guidance_min}, {self.guidance_max}]")


class RescaleLoss:
    """Self-distillation / flow-matching loss of the ×1 student (equations in the module docstring)."""

    def __init__(self, config: RescaleLossConfig):
        self.config = config

    def sample_time(self, batch: int, image_seq_len: int, device) -> torch.Tensor:
        c = self.config
        if c.time_sampling == "uniform":
            return torch.rand(batch, device=device)
        mean = c.logit_mean + (c.shift.mu(image_seq_len) if c.time_sampling == "flux_shift" else 0.0)
        return torch.sigmoid(torch.randn(batch, device=device) * c.logit_std + mean)

    def sample_guidance(self, batch: int, device) -> torch.Tensor:
        c = self.config
        return c.guidance_min + (c.guidance_max - c.guidance_min) * torch.rand(batch, device=device)

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample mean of ℓ(pred − target) over latent elements, [B]."""
        if self.config.loss == "mse":
            per_elem = (pred - target).square()
        else:
            per_elem = F.smooth_l1_loss(pred, target, reduction="none", beta=self.config.smooth_l1_beta)
        return per_elem.flatten(1).mean(1)

    def __call__(self, student: nn.Module, teacher: nn.Module | None, x0_latents: torch.Tensor, inputs: FluxInputs,
                 *, has_guidance: bool, noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> LossOutput:
        """``x0_latents``: packed (VAE − shift)·scale latents [B, N, C]; ``inputs.guidance`` may be preset."""
        c = self.config
        b, n = x0_latents.shape[:2]
        device = x0_latents.device
        x0 = x0_latents.float()
        if t is None:
            t = self.sample_time(b, n, device)
        if noise is None:
            noise = torch.randn_like(x0)
        if has_guidance and inputs.guidance is None:
            inputs.guidance = self.sample_guidance(b, device)
        tb = t.reshape(-1, 1, 1)
        z_t = (1 - tb) * x0 + tb * noise

        if c.objective == "self_distill":
            if teacher is None:
                raise ValueError("self_distill needs the frozen ×1000 teacher")
            with torch.no_grad():
                target = flow_velocity(teacher, z_t, t, inputs)
        else:
            target = noise - x0
        pred = flow_velocity(student, z_t, t, inputs)
        per_sample = self.distance(pred, target)
        loss = per_sample.mean()
        with torch.no_grad():
            sq = per_sample_sq_norm(pred.detach() - target) / pred[0].numel()
            rel = per_sample_sq_norm(pred.detach() - target).sum() / per_sample_sq_norm(target).sum().clamp_min(1e-12)
        name = "teacher" if c.objective == "self_distill" else "data"
        logs = {f"loss_{c.loss}": loss.item(), f"mse_to_{name}": sq.mean().item(), f"rel_mse_to_{name}": rel.item(),
                "t_mean": t.mean().item()}
        terms = {"target_velocity": target, "student_velocity": pred.detach()}
        return LossOutput(loss, logs, terms)


def has_guidance_embedding(transformer: nn.Module) -> bool:
    return bool(getattr(transformer.config, "guidance_embeds", False))


class RescaleMethod:
    """Teacher rescaling on the shared core (``training.core.train``).

    The core loads the transformer with the stock scale (``args.timestep_scale`` = 1000, no rescaled
    checkpoint) and copies it as the teacher; :meth:`build_models` switches the student to ``target_scale``
    (1).  ``flow_matching`` never calls a teacher, so none is copied (:attr:`uses_teacher`).
    """

    name = "rescale"
    # A LoRA rescale run exports fused full weights: the distillation runs need a whole rescaled teacher.
    lora_export = "fused"
    # Flags that change what the saved optimizer state is training towards: a resume must keep them.
    resume_invariants = ("objective", "loss", "smooth_l1_beta", "time_sampling", "logit_mean", "logit_std",
                         "guidance_min", "guidance_max")

    def __init__(self, loss: RescaleLoss, target_scale: float = RESCALED_TIMESTEP_SCALE):
        self.loss_fn = loss
        self.target_scale = float(target_scale)
        self._has_guidance = True

    @property
    def uses_teacher(self) -> bool:
        """flow_matching regresses onto the data velocity: no teacher is copied for it (training/launch.py)."""
        return self.loss_fn.config.objective == "self_distill"

    def build_models(self, args: argparse.Namespace, teacher: DistillFluxTransformer2DModel | None,
                     student: DistillFluxTransformer2DModel) -> tuple[nn.Module, nn.Module]:
        for role, model in (("teacher", teacher), ("student", student)):
            if model is not None and model.timestep_scale != STOCK_TIMESTEP_SCALE:
                raise TrainingError(f"the rescale trainer starts from stock weights (timestep_scale 1000) but the "
                                    f"{role} was loaded with timestep_scale {model.timestep_scale:g}")
        student.set_timestep_scale(self.target_scale)
        self._has_guidance = has_guidance_embedding(student)
        if self.loss_fn.config.objective == "flow_matching":
            if self._has_guidance:
                logger.warning("flow_matching regresses every guidance value onto the data velocity (guidance-1 "
                               "behaviour): the rescaled model loses the teacher's guidance distillation. Use "
                               "--objective self_distill for guidance-distilled teachers such as FLUX.1-dev/lite.")
            return student, nn.Identity()  # the teacher is never evaluated: keep it off the accelerator
        return student, teacher

    def loss(self, student, student_unwrapped, teacher, latents, inputs, step) -> LossOutput:
        teacher = None if isinstance(teacher, nn.Identity) else teacher
        return self.loss_fn(student, teacher, latents, inputs, has_guidance=self._has_guidance)

    def export_state_dict(self, student: DistillFluxTransformer2DModel) -> tuple[dict, dict]:
        config = dict(student.config)
        if float(config["timestep_scale"]) != self.target_scale:
            raise TrainingError(f"student config says timestep_scale {config['timestep_scale']}, expected "
                                f"{self.target_scale:g}")
        return dict(student.state_dict()), config


# --------------------------------------------------------------------------------------------------------
# Final outputs
# --------------------------------------------------------------------------------------------------------

def _replace_dir(tmp: Path, final: Path) -> None:
    """Put folder ``tmp`` at ``final``; an older ``final`` is moved aside first and removed afterwards."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_diffusers_folder(state_dict: dict[str, torch.Tensor], config: dict, folder: str | os.PathLike,
                          max_shard_size: str = "10GB") -> Path:
    """Write ``state_dict`` + ``config`` as a diffusers transformer folder (``save_pretrained``, safetensors).

    The model is built on the meta device and takes the tensors by assignment, so an 8B export needs no
    second copy of the weights in memory.  Written to a temporary sibling and renamed into place.
    """
    from accelerate import init_empty_weights

    folder = Path(folder)
    with init_empty_weights():
        model = DistillFluxTransformer2DModel.from_config(config)
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
    if missing or unexpected:
        raise TrainingError(f"export does not fit its config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(state_dict, strict=True, assign=True)
    if model.config.get("interval_embedding"):
        raise TrainingError("a rescaled teacher has no interval embedding")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        _replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_final_outputs(output_dir: str | os.PathLike, step: int) -> tuple[Path, Path]:
    """Copy ``ckpts/transformer_<step>.pt`` to ``rescaled.pt`` and write ``rescaled_transformer/`` (atomic).

    Returns (rescaled.pt, rescaled_transformer/).  Both load with ``--rescaled_checkpoint_path``.
    """
    from model.loading import read_checkpoint

    out = Path(output_dir)
    export = out / "ckpts" / f"transformer_{step}.pt"
    if not export.exists():
        raise TrainingError(f"{export} is missing: the run did not export its final step")
    ckpt = read_checkpoint(export)
    scale = float((ckpt.config or {}).get("timestep_scale", STOCK_TIMESTEP_SCALE))
    if scale != RESCALED_TIMESTEP_SCALE:
        raise TrainingError(f"{export} has timestep_scale {scale:g}, not 1: it is not a rescale export")
    pt = out / RESCALED_PT
    tmp = out / f".{RESCALED_PT}.tmp"
    try:
        shutil.copyfile(export, tmp)
        os.replace(tmp, pt)
    finally:
        tmp.unlink(missing_ok=True)
    folder = save_diffusers_folder(ckpt.state_dict, ckpt.config, out / RESCALED_FOLDER)
    return pt, folder


# --------------------------------------------------------------------------------------------------------
# Measuring the gap to the original
# --------------------------------------------------------------------------------------------------------

@dataclass
class VelocityPairs:
    """Held-out (x_t, t) pairs: z_t = (1 − t)·x₀ + t·ε with fixed x₀, ε, t, conditioning and guidance."""

    z_t: torch.Tensor  # [P, N, C]
    t: torch.Tensor  # [P]
    inputs: FluxInputs  # batch P (guidance set when the model has a guidance embedding)

    @classmethod
    def from_latents(cls, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, inputs: FluxInputs) -> "VelocityPairs":
        tb = t.reshape(-1, 1, 1)
        return cls((1 - tb) * x0.float() + tb * noise.float(), t.float(), inputs)


def _to(inputs: FluxInputs, device) -> FluxInputs:
    return FluxInputs(inputs.encoder_hidden_states.to(device), inputs.pooled_projections.to(device),
                      inputs.txt_ids.to(device), inputs.img_ids.to(device),
                      None if inputs.guidance is None else inputs.guidance.to(device))


@torch.no_grad()
def velocity_gap(original: nn.Module, rescaled: nn.Module, pairs: VelocityPairs, batch_size: int = 8,
                 t_bins: int = 4) -> dict:
    """How far the rescaled velocity is from the original one on fixed pairs.

    mse      = (1/P)·Σ_i ‖v_R(z_i, t_i) − v_O(z_i, t_i)‖² / D
    rel_mse  = Σ_i ‖v_R − v_O‖² / Σ_i ‖v_O‖²
    mse_by_t = mse restricted to t in [k/K, (k+1)/K), k < K = ``t_bins``
    Both models are called with the same t ∈ [0, 1] and guidance; each applies its own timestep_scale.
    """
    device = next(rescaled.parameters()).device
    sq_err, sq_ref = [], []
    for start in range(0, pairs.t.shape[0], batch_size):
        idx = torch.arange(start, min(start + batch_size, pairs.t.shape[0]))
        inputs = _to(pairs.inputs.select(idx), device)
        z, t = pairs.z_t[idx].to(device), pairs.t[idx].to(device)
        v_o = flow_velocity(original, z, t, inputs)
        v_r = flow_velocity(rescaled, z, t, inputs)
        sq_err.append(per_sample_sq_norm(v_r - v_o).cpu().double())
        sq_ref.append(per_sample_sq_norm(v_o).cpu().double())
    err, ref = torch.cat(sq_err), torch.cat(sq_ref)
    dim = pairs.z_t[0].numel()
    bins = (pairs.t.clamp(0, 1 - 1e-9) * t_bins).long()
    by_t = []
    for k in range(t_bins):
        mask = bins == k
        by_t.append({"t_low": k / t_bins, "t_high": (k + 1) / t_bins, "count": int(mask.sum()),
                     "mse": float(err[mask].mean() / dim) if mask.any() else math.nan})
    return {"num_pairs": int(err.numel()), "mse": float(err.mean() / dim), "rel_mse": float(err.sum() / ref.sum()),
            "mean_sq_norm_original": float(ref.mean() / dim), "mse_by_t": by_t}
