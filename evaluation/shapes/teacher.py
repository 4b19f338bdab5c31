"""A small FLUX teacher for the shapes world, trained from scratch on CPU and cached on disk.

The teacher is a complete diffusers ``FluxPipeline`` folder built with the same classes as the real
``Freepik/flux.1-lite-8B`` (``FluxTransformer2DModel`` with a guidance embedding, ``AutoencoderKL``,
CLIP + T5 text encoders, ``FlowMatchEulerDiscreteScheduler``), so every trainer and sampling CLI of
the project runs on it unchanged. Components and how they are obtained:

* tokenizers, text encoders and scheduler: :func:`data.tiny_flux.build_tiny_flux_pipeline` with the
  sizes of :func:`default_flux_config`. The text encoders stay **random and frozen**: captions differ
  by words, so even random CLIP/T5 give distinguishable embeddings, and the transformer learns to read
  them.
* VAE: an ``AutoencoderKL`` with three blocks (spatial factor 4: 64² pixels → 16×16×8 latents → 8×8 =
  64 packed tokens of 32 channels), **trained** on rendered shapes images with
  ``L = mean|D(z) − x| + β·KL(q(z|x) ‖ N(0, I)) / dim(z)``, ``z ~ q(z|x)``. Afterwards FLUX's latent
  normalisation ``(z − shift)·scale`` is set from the statistics of the posterior means of the training
  images (``shift`` = mean, ``scale`` = 1/std), so the flow model sees latents of unit variance.
* transformer: a stock ``FluxTransformer2DModel`` (time inputs ×1000, as FLUX) trained by flow matching
  on the packed, normalised latents that :class:`model.flux_io.FluxConditioner` produces (the trainers'
  own encoding path)::

      x₀ = pack((VAE(x) − shift)·scale),  ε ~ N(0, I),  z_t = (1 − t)·x₀ + t·ε,  v = ε − x₀
      L = ‖v_θ(z_t, t, g, c) − v‖² / dim(x₀)

  starting from DiT's adaLN-Zero initialisation (every block the identity, output 0), with ``t``
  drawn half from logit-normal(0, 1) (SD3's proposal: mid times, where the content is
  decided) and half from U(0, 1) (so the ends, used by 1-step students and the first sampler step,
  are covered too); caption dropout: with probability ``caption_dropout`` the caption is replaced by
  ``" "`` (the unconditional prompt of the MeanFlow trainer).
  **Guidance**: FLUX.1-lite is guidance-distilled, i.e. it takes the guidance scale ``g`` as an
  embedding input. This teacher keeps that input (``guidance_embeds=True``) and is trained with ``g ~
  U(guidance_min, guidance_max)`` but with the plain conditional target ``v``, so ``g`` is an input the
  model learns to ignore; it is *not* guidance-distilled. Any ``g`` in that range (3.5 for sampling,
  {4, 4.5, 5} in the students' training) therefore gives the conditional model. The exported weights
  are an exponential moving average (``ema_decay``) of the trained ones.

The transformer weights are stored in float16 to keep the folder small (diffusers loads them as float32
unless asked otherwise); the scores in ``teacher_build_info.json`` are measured on the stored weights.

Builds are seeded: the same seed and thread count give bitwise-identical folders. The folder is written
under a temporary name and renamed into place, so an interrupted build never looks complete.

Command line::

    python -m evaluation.shapes.teacher --output_dir assets/shapes_teacher [--seed 0] [--threads 2]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

__all__ = [
    "TeacherConfig",
    "default_flux_config",
    "build_teacher",
    "ensure_teacher",
    "read_build_info",
    "sample_to_folder",
    "BUILD_INFO_NAME",
    "UNCONDITIONAL_PROMPT",
    "main",
]

BUILD_INFO_NAME = "teacher_build_info.json"
#: The prompt that stands for "no caption" (the MeanFlow trainer's unconditional prompt).
UNCONDITIONAL_PROMPT = " "
PathLike = Union[str, "os.PathLike[str]"]


def default_flux_config():
    """Sizes of the teacher pipeline (a :class:`data.tiny_flux.TinyFluxConfig`).

    Transformer: 2 double-stream + 4 single-stream blocks, 4 heads × 32 (inner width 128), guidance
    embedding, 32 input channels (8 latent channels packed 2×2). VAE: 3 blocks (16, 32, 32 channels,
    spatial factor 4), 8 latent channels, no mid-block attention (fully convolutional, cheaper on CPU).
    Text encoders: the tiny CLIP (32 wide) and T5 (32 wide) of :mod:`data.tiny_flux`.
    """
    from data.tiny_flux import TinyFluxConfig

    return TinyFluxConfig(
        num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32,
        axes_dims_rope=(8, 12, 12), guidance_embeds=True,
        vae_block_out_channels=[16, 32, 32], latent_channels=8, vae_norm_num_groups=8, vae_layers_per_block=1,
    )


@dataclass
class TeacherConfig:
    """Everything that determines a teacher build (recorded in ``teacher_build_info.json``)."""

    seed: int = 0
    resolution: int = 64
    #: Rendered training images (training prompts only; held-out prompts are never used).
    num_images: int = 20000
    #: T5 tokens per prompt; the longest shapes caption has 12. Use the same value for training/sampling.
    max_sequence_length: int = 16
    # VAE
    vae_steps: int = 1200
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-4
    vae_mid_block_attention: bool = False
    # transformer (flow matching)
    steps: int = 7000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.998
    guidance_min: float = 1.0
    guidance_max: float = 5.0
    caption_dropout: float = 0.1
    #: Start the transformer from DiT's adaLN-Zero initialisation (see :func:`adaln_zero_init`).
    adaln_zero_init: bool = True
    # evaluation of the stored teacher (held-out prompts)
    eval_prompts_per_tag: int = 8
    eval_samples: int = 2
    eval_steps: int = 28
    eval_guidance: float = 3.5
    eval_batch_size: int = 16
    flux: dict = field(default_factory=lambda: default_flux_config().to_dict())

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        positive = ("resolution", "num_images", "max_sequence_length", "vae_batch_size", "batch_size",
                    "eval_steps", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vae_steps", "steps", "warmup_steps", "eval_prompts_per_tag", "eval_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 0 < guidance_min <= guidance_max, got {self.guidance_min}, {self.guidance_max}")
        factor = 2 ** (len(self.flux["vae_block_out_channels"]) - 1)
        if self.resolution % (2 * factor):
            raise ValueError(f"resolution {self.resolution} must be a multiple of {2 * factor} "
                             f"(VAE factor {factor}, then 2x2 latent packing)")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Small utilities


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, mininterval=1.0)


def _images_from_rows(rows: Sequence[dict]) -> np.ndarray:
    """uint8 array [N, H, W, 3] of the PNG bytes in ``rows`` (``generate_examples`` format)."""
    from PIL import Image

    out = None
    for i, row in enumerate(rows):
        with Image.open(io.BytesIO(row["image"]["bytes"])) as im:
            arr = np.asarray(im.convert("RGB"))
        if out is None:
            out = np.empty((len(rows),) + arr.shape, dtype=np.uint8)
        out[i] = arr
    return out


def _to_pixels(images: np.ndarray):
    """uint8 [B, H, W, 3] → float32 tensor [B, 3, H, W] in [−1, 1] (the trainers' normalisation)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _tmp_sibling(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _publish(tmp: Path, target: Path) -> None:
    """Replace ``target`` by the finished ``tmp`` folder (old one moved aside first, then deleted)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_build_info(folder: PathLike) -> Optional[dict]:
    """The ``teacher_build_info.json`` of a teacher folder, or None when absent/unreadable."""
    try:
        return json.loads((Path(folder) / BUILD_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def warmup_cosine_lr(step: int, total: int, warmup: int, peak: float, min_ratio: float) -> float:
    """LR of 0-based ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay
    lr = peak·(min_ratio + (1 − min_ratio)·½(1 + cos(π·p))), p = (step − warmup)/(total − warmup)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------
# Stage 1: VAE


def train_vae(vae, images: np.ndarray, config: TeacherConfig, progress: bool = True,
              log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Train ``vae`` in place on uint8 ``images`` (see module doc for the loss). Returns the loss log.

    AdamW, 5 % linear warm-up then cosine decay (:func:`warmup_cosine_lr`), gradient clipping at 1. Batches are
    drawn with a generator seeded from ``config.seed``; the reparameterised sample uses the global RNG
    (seeded by the caller).
    """
    import torch

    if config.vae_steps == 0:
        return []
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    warmup = max(1, config.vae_steps // 20)
    gen = torch.Generator().manual_seed(config.seed * 7919 + 1)
    history = []
    bar = _progress(config.vae_steps, "VAE steps", progress)
    for step in range(1, config.vae_steps + 1):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step - 1, config.vae_steps, warmup, config.vae_learning_rate, 0.02)
        idx = torch.randint(len(images), (config.vae_batch_size,), generator=gen)
        x = _to_pixels(images[idx.numpy()])
        posterior = vae.encode(x).latent_dist
        z = posterior.sample()
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean()
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + config.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.update(1)
        if step % 50 == 0 or step == config.vae_steps:
            entry = {"step": step, "l1": rec.item(), "kl": kl.item()}
            history.append(entry)
            bar.set_postfix(l1=f"{entry['l1']:.4f}")
            if log:
                log({"stage": "vae", **entry})
    bar.close()
    vae.eval().requires_grad_(False)
    return history


def vae_statistics(vae, images: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    """(shift, scale) with ``(μ(x) − shift)·scale`` of zero mean and unit std over ``images``,
    μ(x) the posterior mean (what :class:`FluxConditioner` encodes with)."""
    import torch

    total, total_sq, count = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            z = vae.encode(_to_pixels(images[start:start + batch_size])).latent_dist.mean.double()
            total += z.sum().item()
            total_sq += z.square().sum().item()
            count += z.numel()
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 1e-12))
    return float(mean), float(1.0 / std)


def vae_reconstruction_report(vae, images: np.ndarray, specs: Sequence[dict], batch_size: int = 64) -> dict:
    """Mean |error| in 8-bit units and the scorer's accuracy on VAE reconstructions of ``images``
    (the ceiling any latent model of this VAE can reach), next to its accuracy on the originals."""
    import torch

    from evaluation.shapes.scorer import detect, evaluate

    abs_err, max_err, count = 0.0, 0.0, 0
    correct = correct_gt = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x = _to_pixels(chunk)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            rec = ((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            err = np.abs(rec.astype(np.int16) - chunk.astype(np.int16))
            abs_err += float(err.sum())
            max_err = max(max_err, float(err.max()))
            count += err.size
            for k in range(len(chunk)):
                spec = specs[start + k]
                correct += evaluate(detect(rec[k])[0], spec)[0]
                correct_gt += evaluate(detect(chunk[k])[0], spec)[0]
    n = len(images)
    return {"images": n, "mean_abs_error_8bit": abs_err / count, "max_abs_error_8bit": max_err,
            "scorer_accuracy_reconstructed": correct / n, "scorer_accuracy_original": correct_gt / n}


# --------------------------------------------------------------------------------------------
# Stage 2: transformer


def _encode_captions(conditioner, captions: Sequence[str], batch_size: int = 256, progress: bool = True):
    """Unique captions → (T5 embeddings [U, L, D], CLIP pooled [U, P], index of every caption)."""
    import torch

    unique = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(unique)}
    embeds, pooled = [], []
    bar = _progress(len(unique), "text embeddings", progress)
    for start in range(0, len(unique), batch_size):
        e, p, _ = conditioner.encode_prompts(unique[start:start + batch_size])
        embeds.append(e)
        pooled.append(p)
        bar.update(len(e))
    bar.close()
    index = torch.tensor([lookup[c] for c in captions], dtype=torch.long)
    return torch.cat(embeds), torch.cat(pooled), index


def _encode_latents(conditioner, images: np.ndarray, batch_size: int = 64, progress: bool = True):
    """Packed, normalised latents [N, tokens, 4·C] of every image (posterior means)."""
    import torch

    out = []
    bar = _progress(len(images), "VAE latents", progress)
    for start in range(0, len(images), batch_size):
        out.append(conditioner.encode_images(_to_pixels(images[start:start + batch_size])))
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


def sample_flow_times(batch: int, generator) -> "torch.Tensor":
    """Half logit-normal(0, 1), half U(0, 1) flow times in (0, 1)."""
    import torch

    logit = torch.sigmoid(torch.randn(batch, generator=generator))
    uniform = torch.rand(batch, generator=generator)
    pick = torch.rand(batch, generator=generator) < 0.5
    return torch.where(pick, logit, uniform).clamp(1e-4, 1 - 1e-4)


def train_transformer(transformer, latents, caption_embeds, caption_pooled, caption_index, uncond_embeds,
                      uncond_pooled, txt_ids, img_ids, config: TeacherConfig, progress: bool = True,
                      log: Optional[Callable[[dict], None]] = None) -> tuple[dict, list[dict]]:
    """Flow-matching training of a stock FLUX transformer (see module doc); returns (EMA state dict, log).

    The stock forward takes ``timestep`` = flow time t ∈ [0, 1] and multiplies it (and the guidance) by
    1000 itself, exactly as ``FluxPipeline`` calls it. LR: linear warm-up, cosine decay to
    ``min_lr_ratio``·lr. EMA decay ramps as min(decay, (1 + step)/(10 + step)).
    """
    import torch

    gen = torch.Generator().manual_seed(config.seed * 7919 + 2)
    transformer.train().requires_grad_(True)
    params = [p for p in transformer.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, config.steps, config.warmup_steps, config.learning_rate, config.min_lr_ratio)

    history: list[dict] = []
    running = None
    bar = _progress(config.steps, "teacher steps", progress)
    n = latents.shape[0]
    b = config.batch_size
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(n, (b,), generator=gen)
        x0 = latents[idx]
        cap = caption_index[idx]
        enc, pooled = caption_embeds[cap], caption_pooled[cap]
        drop = torch.rand(b, generator=gen) < config.caption_dropout
        enc = torch.where(drop[:, None, None], uncond_embeds.expand_as(enc), enc)
        pooled = torch.where(drop[:, None], uncond_pooled.expand_as(pooled), pooled)
        t = sample_flow_times(b, gen)
        eps = torch.randn(x0.shape, generator=gen)
        g = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(b, generator=gen)
        tb = t[:, None, None]
        z_t = (1 - tb) * x0 + tb * eps
        target = eps - x0
        pred = transformer(hidden_states=z_t, timestep=t, guidance=g, encoder_hidden_states=enc,
                           pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = (pred.float() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            entry = {"step": step + 1, "loss": loss.item(), "loss_smoothed": running, "lr": lr_at(step),
                     "grad_norm": float(grad_norm)}
            history.append(entry)
            bar.set_postfix(loss=f"{running:.4f}")
            if log:
                log({"stage": "transformer", **entry})
    bar.close()
    transformer.eval().requires_grad_(False)
    names = [name for name, _ in transformer.named_parameters()]
    state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    state.update({name: e for name, e in zip(names, ema)})
    return state, history


# --------------------------------------------------------------------------------------------
# Sampling + scoring (used for the build report; the benchmark samples through the test_*.py CLIs)


def sample_to_folder(pipe, metadata: Sequence[dict], root: PathLike, n_samples: int = 2, num_inference_steps: int = 28,
                     guidance_scale: float = 3.5, seed: int = 0, batch_size: int = 16, max_sequence_length: int = 16,
                     resolution: int = 64, progress: bool = True) -> Path:
    """Sample a ``FluxPipeline`` into a GenEval-layout folder: ``root/<i:05d>/samples/<k:04d>.png``.

    Image (i, k) starts from the noise of :func:`evaluation.generate.image_generators` (seed, i, k), as
    in the sampling CLIs, so it does not depend on the batch size or on the other prompts.
    """
    import torch

    from evaluation.generate import image_generators
    from evaluation.geneval_layout import sample_path, write_prompt_metadata

    root = Path(root)
    jobs = [(i, k) for i in range(len(metadata)) for k in range(n_samples)]
    for i, spec in enumerate(metadata):
        write_prompt_metadata(root, i, spec)
    bar = _progress(len(jobs), f"sampling {num_inference_steps} steps", progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        generators = image_generators(seed, chunk)
        with torch.no_grad():
            images = pipe(prompt=[metadata[i]["prompt"] for i, _ in chunk], height=resolution, width=resolution,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          generator=generators, max_sequence_length=max_sequence_length, output_type="pil").images
        for (i, k), image in zip(chunk, images):
            image.save(sample_path(root, i, k))
        bar.update(len(chunk))
    bar.close()
    return root


def score_pipeline(pipe, config: TeacherConfig, work_dir: PathLike, progress: bool = True) -> dict:
    """Sample the held-out prompts at ``eval_steps`` and return the GenEval summary (fractions)."""
    from evaluation.shapes.domain import heldout_specs
    from evaluation.shapes.scorer import score_folder
    from evaluation.summarize_geneval import summarize_rows

    specs = heldout_specs(config.eval_prompts_per_tag, config.seed)
    folder = Path(work_dir) / f"samples_{config.eval_steps}steps"
    pipe.set_progress_bar_config(disable=True)
    sample_to_folder(pipe, specs, folder, config.eval_samples, config.eval_steps, config.eval_guidance, config.seed,
                     config.eval_batch_size, config.max_sequence_length, config.resolution, progress)
    rows = score_folder(folder)
    summary = summarize_rows(rows, specs)
    return {k: summary[k] for k in ("overall", "tasks", "total_images", "correct_images")}


# --------------------------------------------------------------------------------------------
# The build


def build_teacher(output_dir: PathLike, config: Optional[TeacherConfig] = None, progress: bool = True,
                  evaluate: bool = True) -> dict:
    """Build the teacher pipeline into ``output_dir`` (replacing it) and return the build report.

    Stages (times in the report): pipeline skeleton → VAE training → latent statistics and
    reconstruction check → latents/text embeddings of the training set → flow-matching training →
    save (float16 transformer) → reload and score ``eval_steps``-step samples of held-out prompts.
    """
    import torch
    from diffusers import FluxPipeline

    from data.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline
    from evaluation.shapes.domain import generate_examples
    from model.flux_io import FluxConditioner

    config = config or TeacherConfig()
    config.validate()
    output_dir = Path(output_dir).resolve()
    flux_config = TinyFluxConfig(**{**config.flux, "axes_dims_rope": tuple(config.flux["axes_dims_rope"])})
    timings: dict[str, float] = {}
    started = time.perf_counter()
    tmp = _tmp_sibling(output_dir)
    log_lines: list[str] = []

    def log(entry: dict) -> None:
        log_lines.append(json.dumps(entry))

    try:
        # 1. skeleton: tokenizers, frozen random text encoders, scheduler, untrained VAE/transformer
        t0 = time.perf_counter()
        build_tiny_flux_pipeline(tmp / "skeleton", seed=config.seed, config=flux_config)
        pipe = FluxPipeline.from_pretrained(tmp / "skeleton", dtype=torch.float32)
        # from_pretrained records the (temporary) source path; keep the saved configs free of it
        pipe.register_to_config(_name_or_path=output_dir.name)
        pipe.transformer.register_to_config(_name_or_path=f"{output_dir.name}/transformer")
        if not config.vae_mid_block_attention:
            # rebuild the VAE without mid-block attention (same class; fully convolutional)
            from diffusers import AutoencoderKL

            torch.manual_seed(config.seed)
            vae_config = dict(pipe.vae.config)
            vae_config["mid_block_add_attention"] = False
            pipe.vae = AutoencoderKL.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
        timings["skeleton_s"] = time.perf_counter() - t0

        # 2. data: training prompts only, tags balanced
        t0 = time.perf_counter()
        rows = generate_examples(config.num_images, config.resolution, config.seed, "train", progress=progress)
        images = _images_from_rows(rows)
        captions = [r["llava"] for r in rows]
        check_rows = generate_examples(256, config.resolution, config.seed + 1, "heldout")
        check_images = _images_from_rows(check_rows)
        check_specs = [json.loads(r["metadata"]) for r in check_rows]
        timings["render_s"] = time.perf_counter() - t0

        # 3. VAE
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        vae_history = train_vae(pipe.vae, images, config, progress, log)
        shift, scale = vae_statistics(pipe.vae, images[:4096])
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        vae_report = vae_reconstruction_report(pipe.vae, check_images, check_specs)
        vae_report.update({"shift_factor": shift, "scaling_factor": scale,
                           "final_l1": vae_history[-1]["l1"] if vae_history else None})
        if progress:
            print(f"VAE trained: mean |error| {vae_report['mean_abs_error_8bit']:.2f}/255, scorer accuracy on "
                  f"reconstructions {100 * vae_report['scorer_accuracy_reconstructed']:.1f}%", file=sys.stderr)
        timings["vae_s"] = time.perf_counter() - t0

        # 4. latents + text embeddings through the trainers' own conditioner
        t0 = time.perf_counter()
        conditioner = FluxConditioner(pipe, "cpu", config.max_sequence_length)
        latents = _encode_latents(conditioner, images, progress=progress)
        lat_std = float(latents.std())
        embeds, pooled, caption_index = _encode_captions(conditioner, captions, progress=progress)
        uncond_embeds, uncond_pooled, txt_ids = conditioner.encode_prompts([UNCONDITIONAL_PROMPT])
        img_ids = conditioner.image_ids(config.resolution, config.resolution)
        del images
        timings["encode_s"] = time.perf_counter() - t0

        # 5. flow matching
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        if config.adaln_zero_init:
            adaln_zero_init(pipe.transformer)
        state, tf_history = train_transformer(pipe.transformer, latents, embeds, pooled, caption_index, uncond_embeds,
                                              uncond_pooled, txt_ids, img_ids, config, progress, log)
        pipe.transformer.load_state_dict(state)
        timings["transformer_s"] = time.perf_counter() - t0

        # 6. save: float16 transformer (loaded back as float32 by diffusers), float32 elsewhere
        t0 = time.perf_counter()
        final = tmp / "pipeline"
        pipe.transformer.to(torch.float16)
        pipe.save_pretrained(final, safe_serialization=True)
        (final / "logs").mkdir()
        (final / "logs" / "teacher_train.jsonl").write_text("\n".join(log_lines) + "\n", encoding="utf-8")
        timings["save_s"] = time.perf_counter() - t0

        # 7. score what was saved
        evaluation = None
        if evaluate and config.eval_prompts_per_tag > 0 and config.eval_samples > 0:
            t0 = time.perf_counter()
            stored = FluxPipeline.from_pretrained(final, dtype=torch.float32)
            evaluation = score_pipeline(stored, config, tmp / "eval", progress)
            evaluation.update({"steps": config.eval_steps, "guidance": config.eval_guidance,
                               "samples_per_prompt": config.eval_samples})
            timings["eval_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started
        info = {
            "builder": "evaluation.shapes.teacher.build_teacher",
            "config": config.to_dict(),
            "torch_threads": torch.get_num_threads(),
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "vae": vae_report,
            "latent_std": lat_std,
            "transformer": {"parameters": sum(p.numel() for p in pipe.transformer.parameters()),
                            "stored_dtype": "float16", "timestep_scale": 1000,
                            "final_loss_smoothed": tf_history[-1]["loss_smoothed"] if tf_history else None},
            "evaluation": evaluation,
        }
        (final / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _publish(final, output_dir)
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _config_key(config: dict) -> str:
    """Fields that change the weights (evaluation settings excluded)."""
    return json.dumps({k: v for k, v in config.items() if not k.startswith("eval_")}, sort_keys=True)


def ensure_teacher(output_dir: PathLike, config: Optional[TeacherConfig] = None, force: bool = False,
                   progress: bool = True, evaluate: bool = True) -> tuple[Path, dict, bool]:
    """Reuse the teacher in ``output_dir`` when it was built with ``config``; else (or with ``force``)
    build it. Returns ``(folder, build_info, rebuilt)``."""
    config = config or TeacherConfig()
    folder = Path(output_dir).resolve()
    info = read_build_info(folder)
    if (not force and info is not None and (folder / "model_index.json").is_file()
            and _config_key(info.get("config", {})) == _config_key(config.to_dict())):
        return folder, info, False
    return folder, build_teacher(folder, config, progress, evaluate), True


# --------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    defaults = TeacherConfig()
    p = argparse.ArgumentParser(
        prog="python -m evaluation.shapes.teacher",
        description="Build (train) the shapes-world FLUX teacher pipeline: a VAE trained on rendered shapes, frozen "
                    "random text encoders, a FluxTransformer2DModel trained by flow matching. Writes a FluxPipeline "
                    f"folder with {BUILD_INFO_NAME} (timings, VAE reconstruction check, held-out score).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", required=True, help="pipeline folder to write (replaced atomically when done)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of every random choice of the build")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, i.e. OMP_NUM_THREADS); the same seed and thread "
                        "count give identical weights")
    p.add_argument("--num_images", type=int, default=defaults.num_images, help="rendered training images")
    p.add_argument("--vae_steps", type=int, default=defaults.vae_steps, help="VAE optimizer steps")
    p.add_argument("--steps", type=int, default=defaults.steps, help="flow-matching optimizer steps of the transformer")
    p.add_argument("--batch_size", type=int, default=defaults.batch_size, help="flow-matching batch size")
    p.add_argument("--learning_rate", type=float, default=defaults.learning_rate, help="flow-matching peak LR")
    p.add_argument("--eval_prompts_per_tag", type=int, default=defaults.eval_prompts_per_tag,
                   help="held-out prompts per GenEval tag scored after the build (0: skip scoring)")
    p.add_argument("--eval_samples", type=int, default=defaults.eval_samples, help="samples per held-out prompt")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUTPUT_DIR when it already holds a teacher built with the same settings")
    p.add_argument("--no_progress", action="store_true", help="disable progress bars")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    config = replace(TeacherConfig(), seed=args.seed, num_images=args.num_images, vae_steps=args.vae_steps,
                     steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                     eval_prompts_per_tag=args.eval_prompts_per_tag, eval_samples=args.eval_samples)
    try:
        config.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        print(f"error: --output_dir {out} exists and is not a folder; choose another path", file=sys.stderr)
        return 2
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    folder, info, rebuilt = ensure_teacher(out, config, force=not args.reuse, progress=not args.no_progress)
    verb = "built" if rebuilt else "reused"
    print(f"{verb} teacher at {folder}")
    if rebuilt:
        print(f"build time {info['timings']['total_s']:.0f} s ({json.dumps(info['timings'])})")
    vae = info["vae"]
    print(f"VAE: mean |error| {vae['mean_abs_error_8bit']:.2f}/255, scorer on reconstructions "
          f"{100 * vae['scorer_accuracy_reconstructed']:.1f}% (originals {100 * vae['scorer_accuracy_original']:.1f}%)")
    if info.get("evaluation"):
        ev = info["evaluation"]
        tasks = ", ".join(f"{k} {100 * v['accuracy']:.0f}" for k, v in ev["tasks"].items())
        print(f"{ev['steps']}-step held-out score: overall {100 * ev['overall']:.1f}% ({tasks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
