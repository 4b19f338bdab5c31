"""Classifier-free guidance of a flow model and guidance distillation as FLUX-dev (recipes v2–v4)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from evaluation.shapes.teacher_build.common import warmup_cosine_lr
from evaluation.shapes.teacher_build.flow import draw_flow_batch
from evaluation.shapes.teacher_build.optim import Budget, StageResult, optimise
from evaluation.shapes.teacher_build.recipes import TeacherConfig
from evaluation.shapes.teacher_build.text import FrozenText


def cfg_velocity(teacher, z_t, t, guidance_input: float, cond: tuple, uncond: tuple, w: "torch.Tensor", txt_ids,
                 img_ids) -> "torch.Tensor":
    """Classifier-free guidance of a flow model: v_u + w·(v_c − v_u), both in one batched forward."""
    import torch

    enc = torch.cat([cond[0], uncond[0].expand_as(cond[0])])
    pooled = torch.cat([cond[1], uncond[1].expand_as(cond[1])])
    g = torch.full((2 * z_t.shape[0],), float(guidance_input))
    v = teacher(hidden_states=torch.cat([z_t, z_t]), timestep=torch.cat([t, t]), guidance=g,
                encoder_hidden_states=enc, pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids,
                return_dict=False)[0].float()
    v_c, v_u = v.chunk(2)
    return v_u + w[:, None, None] * (v_c - v_u)


def run_guidance_distillation(student, teacher, text: FrozenText, latents, caption_index, txt_ids, img_ids,
                              config: TeacherConfig, checkpoint: Optional[Path] = None,
                              budget: Optional[Budget] = None, progress: bool = True,
                              log: Optional[Callable[[dict], None]] = None) -> StageResult:
    """Guidance distillation as FLUX-dev (Meng et al. 2023, stage 1): the student, started from the frozen
    CFG teacher, learns its guided velocity with the scale as an input::

        w ~ U(distill_guidance_min, distill_guidance_max),  z_t = (1 − t)·x₀ + t·ε
        L = ‖v_θ(z_t, t, g=w, c) − [v_u + w·(v_c − v_u)]‖² / dim(x₀)

    with v_c, v_u the teacher's velocities for the caption and the unconditional prompt (guidance input
    ``flow_guidance``). Captions are dropped with ``caption_dropout`` as before (then v_c = v_u, the target is
    v_u at every w), so the unconditional prompt keeps its meaning.
    """
    import torch

    gen = torch.Generator().manual_seed(config.seed * 7919 + 3)
    teacher.eval().requires_grad_(False)
    b = config.distill_batch_size
    uncond = (text.uncond_embeds, text.uncond_pooled)

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, config.distill_steps, config.distill_warmup_steps,
                                config.distill_learning_rate, config.min_lr_ratio)

    def loss_fn(step: int):
        x0, enc, pooled, t, eps = draw_flow_batch(gen, latents, caption_index, text, b, config.caption_dropout,
                                                  time_shift=config.flow_time_shift)
        lo, hi = config.distill_guidance_min, config.distill_guidance_max
        w = lo + (hi - lo) * torch.rand(b, generator=gen)
        tb = t[:, None, None]
        z_t = (1 - tb) * x0 + tb * eps
        with torch.no_grad():
            target = cfg_velocity(teacher, z_t, t, config.flow_guidance, (enc, pooled), uncond, w, txt_ids, img_ids)
        pred = student(hidden_states=z_t, timestep=t, guidance=w, encoder_hidden_states=enc,
                       pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return (pred.float() - target).square().mean()

    return optimise("guidance_distill", {"transformer": student}, loss_fn, config.distill_steps, lr_at, gen, config,
                    checkpoint, budget, progress, log)
