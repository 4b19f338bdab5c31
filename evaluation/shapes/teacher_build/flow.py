"""Flow matching of the teacher's FLUX transformer (module doc of :mod:`evaluation.shapes.teacher`):
latents, initialisation, the draw of a training batch and the stage itself."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from evaluation.shapes.teacher_build.common import progress_bar, to_pixels, warmup_cosine_lr
from evaluation.shapes.teacher_build.optim import Budget, StageResult, optimise
from evaluation.shapes.teacher_build.recipes import TeacherConfig
from evaluation.shapes.teacher_build.text import FrozenText


def encode_latents(conditioner, images: np.ndarray, batch_size: int = 64, progress: bool = True):
    """Packed, normalised latents [N, tokens, 4·C] of every image (posterior means)."""
    import torch

    out = []
    bar = progress_bar(len(images), "VAE latents", progress)
    for start in range(0, len(images), batch_size):
        out.append(conditioner.encode_images(to_pixels(images[start:start + batch_size])))
        bar.update(len(out[-1]))
    bar.close()
    return torch.cat(out)


def adaln_zero_init(transformer) -> int:
    """DiT's adaLN-Zero initialisation on a FLUX transformer; returns the number of zeroed layers.

    Zeroes the linear layers that produce the adaptive-norm shift/scale/gate of every double- and
    single-stream block and of the output norm, and the output projection. Each block then starts as
    the identity (its residual branches are gated by 0) and the model outputs v = 0: Peebles & Xie
    (2023) found this the fastest-converging conditioning/initialisation. It changes initial values
    only; the architecture is the stock one.
    """
    from torch import nn

    layers = []
    for block in transformer.transformer_blocks:
        layers += [block.norm1.linear, block.norm1_context.linear]
    for block in transformer.single_transformer_blocks:
        layers.append(block.norm.linear)
    layers += [transformer.norm_out.linear, transformer.proj_out]
    for layer in layers:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    return len(layers)


def sample_flow_times(batch: int, generator, shift: float = 1.0) -> "torch.Tensor":
    """Half logit-normal(0, 1), half U(0, 1) flow times in (0, 1), then :func:`shift_flow_times`."""
    import torch

    logit = torch.sigmoid(torch.randn(batch, generator=generator))
    uniform = torch.rand(batch, generator=generator)
    pick = torch.rand(batch, generator=generator) < 0.5
    t = torch.where(pick, logit, uniform)
    return shift_flow_times(t, shift).clamp(1e-4, 1 - 1e-4)


def shift_flow_times(t: "torch.Tensor", shift: float) -> "torch.Tensor":
    """SD3's timestep shift t ↦ s·t / (1 + (s − 1)·t): monotone, fixes 0 and 1, moves the median time 1/2 to
    s / (1 + s). It adds log s to logit(t): diffusers' ``time_shift(μ = log s, 1, t)``, the shift that
    ``training.rescale``'s ``flux_shift`` sampling applies inside its logit-normal draw; here it acts on this
    builder's half-uniform mixture too. ``shift`` 1 returns ``t`` itself (so unshifted builds stay bit-identical)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def train_transformer(transformer, latents, caption_embeds, caption_pooled, caption_index, uncond_embeds,
                      uncond_pooled, txt_ids, img_ids, config: TeacherConfig, progress: bool = True,
                      log: Optional[Callable[[dict], None]] = None) -> tuple[dict, list[dict]]:
    """Flow-matching training of a stock FLUX transformer on frozen text embeddings (recipe v1; see
    module doc); returns (EMA state dict, log). A thin wrapper of :func:`run_flow_matching`."""
    text = FrozenText(caption_embeds, caption_pooled, uncond_embeds, uncond_pooled)
    result = run_flow_matching({"transformer": transformer}, text, latents, caption_index, txt_ids, img_ids,
                               config, progress=progress, log=log)
    return result.ema["transformer"], result.history



def draw_flow_batch(generator, latents, caption_index, text, batch: int, caption_dropout: float,
                    row_weights: Optional["torch.Tensor"] = None, time_shift: float = 1.0):
    """One training batch, in a fixed order of draws from ``generator`` (resumes depend on it): image rows
    (uniform, or in proportion to ``row_weights``), caption-dropout mask, flow times (shifted by
    ``time_shift``, :func:`shift_flow_times`), noise. Returns (x₀, T5 states, pooled CLIP, t, ε)."""
    import torch

    if row_weights is None:
        idx = torch.randint(latents.shape[0], (batch,), generator=generator)
    else:
        idx = torch.multinomial(row_weights, batch, replacement=True, generator=generator)
    x0 = latents[idx]
    drop = torch.rand(batch, generator=generator) < caption_dropout
    enc, pooled = text(caption_index[idx], drop)
    t = sample_flow_times(batch, generator, time_shift)
    eps = torch.randn(x0.shape, generator=generator)
    return x0, enc, pooled, t, eps


def tag_row_weights(tags: Sequence[str], weights: dict) -> "torch.Tensor":
    """Draw weight of every training row from its GenEval tag (tags missing from ``weights`` weigh 1)."""
    import torch

    return torch.tensor([float(weights.get(tag, 1.0)) for tag in tags])


def flow_matching_loss(transformer, batch: tuple, guidance: "torch.Tensor", txt_ids, img_ids) -> "torch.Tensor":
    """Rectified-flow loss ‖v_θ(z_t, t) − (ε − x₀)‖², z_t = (1 − t)·x₀ + t·ε, of a :func:`draw_flow_batch` batch."""
    x0, enc, pooled, t, eps = batch
    tb = t[:, None, None]
    z_t = (1 - tb) * x0 + tb * eps
    pred = transformer(hidden_states=z_t, timestep=t, guidance=guidance, encoder_hidden_states=enc,
                       pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return (pred.float() - (eps - x0)).square().mean()


def run_flow_matching(modules: dict, text, latents, caption_index, txt_ids, img_ids, config: TeacherConfig,
                      checkpoint: Optional[Path] = None, budget: Optional[Budget] = None, progress: bool = True,
                      log: Optional[Callable[[dict], None]] = None,
                      row_weights: Optional["torch.Tensor"] = None) -> StageResult:
    """Flow matching of ``modules["transformer"]`` (and of the text encoders in ``modules`` when ``text`` is a
    :class:`TrainableText`); see the module doc for the objective.

    The stock forward takes ``timestep`` = flow time t ∈ [0, 1] and multiplies it (and the guidance) by
    1000 itself, exactly as ``FluxPipeline`` calls it. LR: linear warm-up, cosine decay to
    ``min_lr_ratio``·lr. ``row_weights``: draw weight of each training row (None: uniform;
    :func:`tag_row_weights` of ``config.flow_tag_weights``).
    """
    import torch

    transformer = modules["transformer"]
    gen = torch.Generator().manual_seed(config.seed * 7919 + 2)
    b = config.batch_size

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, config.steps, config.warmup_steps, config.learning_rate, config.min_lr_ratio)

    def loss_fn(step: int):
        batch = draw_flow_batch(gen, latents, caption_index, text, b, config.caption_dropout, row_weights,
                                config.flow_time_shift)
        if config.flow_guidance is None:
            g = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(b, generator=gen)
        else:
            g = torch.full((b,), float(config.flow_guidance))
        return flow_matching_loss(transformer, batch, g, txt_ids, img_ids)

    return optimise("transformer", modules, loss_fn, config.steps, lr_at, gen, config, checkpoint, budget,
                    progress, log)
