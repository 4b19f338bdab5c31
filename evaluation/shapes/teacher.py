"""A small FLUX teacher for the shapes world, trained from scratch on CPU and cached on disk.

The teacher is a complete diffusers ``FluxPipeline`` folder built with the same classes as the real
``Freepik/flux.1-lite-8B`` (``FluxTransformer2DModel`` with a guidance embedding, ``AutoencoderKL``,
CLIP + T5 text encoders, ``FlowMatchEulerDiscreteScheduler``), so every trainer and sampling CLI of
the project runs on it unchanged. Components and how they are obtained:

* tokenizers, text encoders and scheduler: :func:`data.tiny_flux.build_tiny_flux_pipeline` with the
  sizes of :func:`default_flux_config`. In recipe v1 the text encoders stay **random and frozen**:
  captions differ by words, so even random CLIP/T5 give distinguishable word embeddings (but not
  binding; see recipe v2 below).
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

Recipe v2 (``--recipe v2``, :func:`teacher_recipe`; why: docs/toy_benchmark/teacher_diagnosis.md) changes
three things: the CLIP and T5 encoders are **trained jointly** with the transformer during flow matching
(random frozen ones hand the transformer, which sees text tokens without position, the same bag of word
vectors whatever binds to what); flow matching feeds a constant guidance input ``flow_guidance`` = 1 with
caption dropout, so classifier-free guidance works; then **guidance distillation** as FLUX-dev
(:func:`run_guidance_distillation`): the guidance embedding learns the CFG velocity for w ~ U[1, 6].

Recipe v3 first pretrains the text encoders to parse the captions (:func:`run_text_pretraining`): the
joint training of v2 alone separated words but not binding after hundreds of steps. Recipe v4 then
keeps them frozen during flow matching (as FLUX's): joint training undid the pretrained binding.

Long builds run in resumable stages: with ``state_dir`` every stage keeps its state there and a
``Budget`` (``--max_minutes``) stops a call early; the same call again continues bit-identically.

The transformer weights are stored in float16 to keep the folder small (diffusers loads them as float32
unless asked otherwise); the scores in ``teacher_build_info.json`` are measured on the stored weights.

Builds are seeded: the same seed and thread count give bitwise-identical folders. The folder is written
under a temporary name and renamed into place, so an interrupted build never looks complete.

Command line::

    python -m evaluation.shapes.teacher --output_dir assets/shapes_teacher [--seed 0] [--threads 2]
    python -m evaluation.shapes.teacher --recipe v4 --output_dir OUT --state_dir STATE --max_minutes 80 \
        --reuse_vae_from assets/shapes_teacher      # repeat until it prints "built teacher"
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
    "teacher_recipe",
    "RECIPES",
    "COMMITTED_RECIPE",
    "Budget",
    "optimise",
    "run_flow_matching",
    "run_guidance_distillation",
    "cfg_velocity",
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
    # Fields below were added with recipe v2; their defaults reproduce v1 exactly, so a build info
    # written before they existed has the same key as TeacherConfig() (see _config_key).
    #: Train the CLIP and T5 text encoders jointly with the transformer during flow matching (then
    #: freeze them). The random frozen encoders give each word the same vector whatever it is bound
    #: to, and FLUX gives text tokens no position (txt_ids = 0), so the transformer would see a bag of
    #: words: "a red square and a green circle" ≈ "a red circle and a green square" (cosine ≥ 0.996).
    train_text_encoders: bool = False
    #: Guidance input during flow matching: None draws g ~ U(guidance_min, guidance_max) that the target
    #: ignores (v1); a number feeds that constant (v2: 1, "no guidance", where guidance distillation starts).
    flow_guidance: Optional[float] = None
    # guidance distillation, as FLUX-dev: the guidance embedding learns the CFG output (0 steps: none)
    distill_steps: int = 0
    distill_batch_size: int = 32
    distill_learning_rate: float = 3e-4
    distill_warmup_steps: int = 100
    distill_guidance_min: float = 1.0
    distill_guidance_max: float = 6.0
    #: Caption-parsing pretraining of the text encoders before flow matching (0: none; v3), the role
    #: pretraining plays for FLUX's T5-XXL: from the T5 tokens through an order-blind attention read-out
    #: (like the transformer's, which sees no text positions) and from the pooled CLIP vector, predict each
    #: object's shape, colour and count and the relation (see :class:`CaptionProbe`). A bag of words cannot
    #: solve it, so the encoders must write binding and order into their tokens.
    text_pretrain_steps: int = 0
    text_pretrain_batch_size: int = 64
    text_pretrain_learning_rate: float = 1e-3
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
        for name in ("vae_steps", "steps", "warmup_steps", "eval_prompts_per_tag", "eval_samples", "distill_steps",
                     "distill_warmup_steps", "text_pretrain_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 0 < guidance_min <= guidance_max, got {self.guidance_min}, {self.guidance_max}")
        if self.distill_steps and not 0 < self.distill_guidance_min <= self.distill_guidance_max:
            raise ValueError("need 0 < distill_guidance_min <= distill_guidance_max, got "
                             f"{self.distill_guidance_min}, {self.distill_guidance_max}")
        if self.distill_steps and self.flow_guidance is None:
            raise ValueError("distill_steps > 0 needs flow_guidance (the constant guidance input the CFG teacher "
                             "was trained with, e.g. 1.0)")
        factor = 2 ** (len(self.flux["vae_block_out_channels"]) - 1)
        if self.resolution % (2 * factor):
            raise ValueError(f"resolution {self.resolution} must be a multiple of {2 * factor} "
                             f"(VAE factor {factor}, then 2x2 latent packing)")

    def to_dict(self) -> dict:
        return asdict(self)


#: Named build recipes. v1: the teacher of issue 6 (frozen random text encoders, guidance input
#: ignored). v2: text encoders trained jointly, caption dropout for CFG, then guidance distillation.
#: v3: v2 after a caption-parsing pretraining of the text encoders (text_pretrain_steps).
#: v4: v3 with the pretrained encoders frozen during flow matching (joint training undid the binding).
RECIPES = ("v1", "v2", "v3", "v4")
#: The recipe of the teacher committed in assets/shapes_teacher (what ``--rebuild_teacher`` remakes).
COMMITTED_RECIPE = "v1"


def teacher_recipe(name: str = COMMITTED_RECIPE) -> TeacherConfig:
    """The :class:`TeacherConfig` of recipe ``name`` (one of :data:`RECIPES`)."""
    if name == "v1":
        return TeacherConfig()
    if name == "v2":
        return replace(TeacherConfig(), train_text_encoders=True, flow_guidance=1.0, caption_dropout=0.15,
                       steps=15000, distill_steps=3000, eval_prompts_per_tag=34, eval_guidance=4.0)
    if name == "v3":
        return replace(teacher_recipe("v2"), text_pretrain_steps=3000)
    if name == "v4":  # the pretrained encoders stay frozen during flow matching, as FLUX's
        return replace(teacher_recipe("v3"), train_text_encoders=False)
    raise ValueError(f"unknown teacher recipe {name!r}; choose one of {', '.join(RECIPES)}")


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
    """Flow-matching training of a stock FLUX transformer on frozen text embeddings (recipe v1; see
    module doc); returns (EMA state dict, log). A thin wrapper of :func:`run_flow_matching`."""
    text = FrozenText(caption_embeds, caption_pooled, uncond_embeds, uncond_pooled)
    result = run_flow_matching({"transformer": transformer}, text, latents, caption_index, txt_ids, img_ids,
                               config, progress=progress, log=log)
    return result.ema["transformer"], result.history


class FrozenText:
    """Precomputed text conditioning: rows of ``embeds``/``pooled`` per caption, the unconditional
    prompt's where the caption is dropped."""

    def __init__(self, embeds, pooled, uncond_embeds, uncond_pooled):
        self.embeds, self.pooled = embeds, pooled
        self.uncond_embeds, self.uncond_pooled = uncond_embeds, uncond_pooled

    def __call__(self, caption: "torch.Tensor", drop: "torch.Tensor"):
        import torch

        enc, pooled = self.embeds[caption], self.pooled[caption]
        enc = torch.where(drop[:, None, None], self.uncond_embeds.expand_as(enc), enc)
        pooled = torch.where(drop[:, None], self.uncond_pooled.expand_as(pooled), pooled)
        return enc, pooled


class TrainableText:
    """Text conditioning through the pipeline's own CLIP and T5 encoders, with gradients.

    Token ids are computed once with the pipeline's tokenizers and the arguments of
    ``FluxPipeline.encode_prompt`` (CLIP: padded/truncated to 77, ``pooler_output``; T5: padded/truncated to
    ``max_sequence_length``, last hidden state), so after training ``FluxPipeline`` encodes a caption exactly
    as this class did. The last row is the unconditional prompt.
    """

    def __init__(self, pipe, captions: Sequence[str], max_sequence_length: int):
        self.clip, self.t5 = pipe.text_encoder, pipe.text_encoder_2
        prompts = list(captions) + [UNCONDITIONAL_PROMPT]
        self.clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        self.t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length,
                                       truncation=True, return_tensors="pt").input_ids
        self.uncond = len(prompts) - 1

    def encode(self, rows: "torch.Tensor"):
        """(T5 hidden states [B, L, D], CLIP pooled [B, P]) of caption rows ``rows``."""
        enc = self.t5(self.t5_ids[rows], output_hidden_states=False)[0]
        pooled = self.clip(self.clip_ids[rows], output_hidden_states=False).pooler_output
        return enc.float(), pooled.float()

    def __call__(self, caption: "torch.Tensor", drop: "torch.Tensor"):
        import torch

        return self.encode(torch.where(drop, torch.full_like(caption, self.uncond), caption))


@dataclass
class Budget:
    """When a resumable stage stops early (None: never): wall-clock minutes or optimizer steps of this run."""

    max_minutes: Optional[float] = None
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        self._start = time.monotonic()
        self._steps = 0

    def spend(self) -> bool:
        """Count one step; True when the budget is used up."""
        self._steps += 1
        if self.max_steps is not None and self._steps >= self.max_steps:
            return True
        return self.max_minutes is not None and time.monotonic() - self._start >= 60 * self.max_minutes


@dataclass
class StageResult:
    """Outcome of a resumable optimisation stage: EMA weights per module (None when paused)."""

    step: int
    total: int
    history: list
    ema: Optional[dict] = None

    @property
    def done(self) -> bool:
        return self.step >= self.total


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def optimise(name: str, modules: dict, loss_fn: Callable[[int], "torch.Tensor"], total: int,
             lr_at: Callable[[int], float], generator, config: TeacherConfig, checkpoint: Optional[Path] = None,
             budget: Optional[Budget] = None, progress: bool = True, log: Optional[Callable[[dict], None]] = None,
             checkpoint_minutes: float = 10.0) -> StageResult:
    """A resumable AdamW loop over the parameters of ``modules`` (betas 0.9/0.99, gradient clipping at
    ``config.max_grad_norm``, EMA with decay min(ema_decay, (1 + step)/(10 + step))).

    ``loss_fn(step)`` draws its batch from ``generator``. With ``checkpoint``, the loop resumes from that file
    when it exists and writes it (weights, EMA, optimizer, generator state, log) every ``checkpoint_minutes``,
    when ``budget`` runs out (returns a paused result) and at the end, so an interrupted stage continues
    bit-identically.
    """
    import torch

    params = [p for m in modules.values() for p in m.parameters()]
    for m in modules.values():
        m.requires_grad_(True)  # train/eval mode is the caller's (the text encoders train without dropout)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr_at(0), weight_decay=config.weight_decay, betas=(0.9, 0.99))
    start, history, running = 0, [], None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        for key, m in modules.items():
            m.load_state_dict(state["modules"][key])
        for e, saved in zip(ema, state["ema"]):
            e.copy_(saved)
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, history, running = state["step"], state["history"], state["running"]

    def save(step: int) -> None:
        if checkpoint is not None:
            _atomic_save({"step": step, "modules": {k: m.state_dict() for k, m in modules.items()}, "ema": ema,
                          "optimizer": opt.state_dict(), "generator": generator.get_state(),
                          "torch_rng": torch.get_rng_state(), "history": history,
                          "running": running}, checkpoint)

    bar = _progress(total, f"{name} steps", progress)
    bar.update(start)
    last_save = time.monotonic()
    step = start
    paused = False
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        step += 1
        bar.update(1)
        if step % 50 == 0 or step == total:
            entry = {"step": step, "loss": loss.item(), "loss_smoothed": running, "lr": lr_at(step - 1),
                     "grad_norm": float(grad_norm)}
            history.append(entry)
            bar.set_postfix(loss=f"{running:.4f}")
            if log:
                log({"stage": name, **entry})
        if step < total and budget is not None and budget.spend():
            paused = True
            break
        if checkpoint is not None and time.monotonic() - last_save >= 60 * checkpoint_minutes:
            save(step)
            last_save = time.monotonic()
    bar.close()
    if step > start or (checkpoint is not None and not checkpoint.is_file()):
        save(step)
    for m in modules.values():
        m.requires_grad_(False)
    if paused:
        return StageResult(step, total, history)
    return StageResult(step, total, history, _ema_state_dicts(modules, params, ema))


def _ema_state_dicts(modules: dict, params: list, ema: list) -> dict:
    """State dicts of ``modules`` with the EMA in place of every parameter. Taken through the modules
    themselves, so tied weights (T5's ``shared`` = ``encoder.embed_tokens``) get the EMA under every name."""
    import torch

    with torch.no_grad():
        trained = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):
            p.copy_(e)
        out = {key: {k: v.detach().clone() for k, v in m.state_dict().items()} for key, m in modules.items()}
        for p, saved in zip(params, trained):
            p.copy_(saved)
    return out


def draw_flow_batch(generator, latents, caption_index, text, batch: int, caption_dropout: float):
    """One training batch, in a fixed order of draws from ``generator`` (resumes depend on it): image rows,
    caption-dropout mask, flow times, noise. Returns (x₀, T5 states, pooled CLIP, t, ε)."""
    import torch

    idx = torch.randint(latents.shape[0], (batch,), generator=generator)
    x0 = latents[idx]
    drop = torch.rand(batch, generator=generator) < caption_dropout
    enc, pooled = text(caption_index[idx], drop)
    t = sample_flow_times(batch, generator)
    eps = torch.randn(x0.shape, generator=generator)
    return x0, enc, pooled, t, eps


def run_flow_matching(modules: dict, text, latents, caption_index, txt_ids, img_ids, config: TeacherConfig,
                      checkpoint: Optional[Path] = None, budget: Optional[Budget] = None, progress: bool = True,
                      log: Optional[Callable[[dict], None]] = None) -> StageResult:
    """Flow matching of ``modules["transformer"]`` (and of the text encoders in ``modules`` when ``text`` is a
    :class:`TrainableText`); see the module doc for the objective.

    The stock forward takes ``timestep`` = flow time t ∈ [0, 1] and multiplies it (and the guidance) by
    1000 itself, exactly as ``FluxPipeline`` calls it. LR: linear warm-up, cosine decay to
    ``min_lr_ratio``·lr.
    """
    import torch

    transformer = modules["transformer"]
    gen = torch.Generator().manual_seed(config.seed * 7919 + 2)
    b = config.batch_size

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, config.steps, config.warmup_steps, config.learning_rate, config.min_lr_ratio)

    def loss_fn(step: int):
        x0, enc, pooled, t, eps = draw_flow_batch(gen, latents, caption_index, text, b, config.caption_dropout)
        if config.flow_guidance is None:
            g = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(b, generator=gen)
        else:
            g = torch.full((b,), float(config.flow_guidance))
        tb = t[:, None, None]
        z_t = (1 - tb) * x0 + tb * eps
        pred = transformer(hidden_states=z_t, timestep=t, guidance=g, encoder_hidden_states=enc,
                           pooled_projections=pooled, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return (pred.float() - (eps - x0)).square().mean()

    return optimise("transformer", modules, loss_fn, config.steps, lr_at, gen, config, checkpoint, budget,
                    progress, log)


#: Read-out heads of :class:`CaptionProbe`: (name, classes); class 0 = "absent".
CAPTION_HEADS: tuple[tuple[str, int], ...] = (
    ("shape_0", 4), ("color_0", 7), ("count_0", 5), ("shape_1", 4), ("color_1", 7), ("count_1", 5), ("relation", 5))


def caption_targets(spec: Optional[dict]) -> list[int]:
    """Class indices of :data:`CAPTION_HEADS` for a GenEval metadata dict (None: the unconditional prompt).

    Objects are taken in the metadata's include order (for position prompts: reference, then subject), so
    a caption and its binding- or order-swapped twin have different targets.
    """
    from evaluation.shapes.domain import COLORS, RELATIONS, SHAPES

    include = spec["include"] if spec else []
    out = []
    for slot in range(2):
        obj = include[slot] if slot < len(include) else None
        out += [SHAPES.index(obj["class"]) + 1 if obj else 0, COLORS.index(obj["color"]) + 1 if obj else 0,
                int(obj["count"]) if obj else 0]
    relation = next((o["position"][0] for o in include if "position" in o), None)
    out.append(RELATIONS.index(relation) + 1 if relation else 0)
    return out


def _caption_probe_class():
    import torch
    from torch import nn

    class CaptionProbe(nn.Module):
        """Order-blind read-out of the T5 tokens (learned queries attending over them, no positions, as
        FLUX's joint attention reads text) and a linear read-out of the pooled CLIP vector, each predicting
        :data:`CAPTION_HEADS`. Used only to pretrain the encoders; discarded afterwards."""

        def __init__(self, t5_dim: int, clip_dim: int, heads: int = 4):
            super().__init__()
            self.queries = nn.Parameter(torch.randn(3, t5_dim) / math.sqrt(t5_dim))  # slot 0, slot 1, relation
            self.attention = nn.MultiheadAttention(t5_dim, heads, batch_first=True)
            sizes = [n for _, n in CAPTION_HEADS]
            self.slot_out = nn.Linear(t5_dim, sum(sizes[:3]))
            self.relation_out = nn.Linear(t5_dim, sizes[6])
            self.clip_out = nn.Linear(clip_dim, sum(sizes))

        def forward(self, t5_tokens, pooled):
            q = self.queries.expand(t5_tokens.shape[0], -1, -1)
            read, _ = self.attention(q, t5_tokens, t5_tokens, need_weights=False)
            t5_logits = torch.cat([self.slot_out(read[:, 0]), self.slot_out(read[:, 1]),
                                   self.relation_out(read[:, 2])], dim=-1)
            return t5_logits, self.clip_out(pooled)

    return CaptionProbe


def caption_probe_loss(logits: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """Sum over :data:`CAPTION_HEADS` of the cross-entropy of the concatenated ``logits``."""
    import torch.nn.functional as F

    loss, start = 0.0, 0
    for k, (_, n) in enumerate(CAPTION_HEADS):
        loss = loss + F.cross_entropy(logits[:, start:start + n], targets[:, k])
        start += n
    return loss


def run_text_pretraining(text: "TrainableText", targets: "torch.Tensor", config: TeacherConfig,
                         checkpoint: Optional[Path] = None, budget: Optional[Budget] = None, progress: bool = True,
                         log: Optional[Callable[[dict], None]] = None) -> StageResult:
    """Caption-parsing pretraining of ``text``'s CLIP and T5 (see ``TeacherConfig.text_pretrain_steps``):
    ``L = CE(probe(T5 tokens)) + CE(probe(pooled CLIP))`` over the rows of ``targets`` (one per caption of
    ``text``, the unconditional prompt last). The probe is seeded from ``config.seed`` and discarded."""
    import torch

    torch.manual_seed(config.seed * 7919 + 4)
    probe = _caption_probe_class()(text.t5.config.d_model, text.clip.config.hidden_size)
    gen = torch.Generator().manual_seed(config.seed * 7919 + 5)
    rows = targets.shape[0]

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, config.text_pretrain_steps, max(1, config.text_pretrain_steps // 20),
                                config.text_pretrain_learning_rate, config.min_lr_ratio)

    def loss_fn(step: int):
        idx = torch.randint(rows, (config.text_pretrain_batch_size,), generator=gen)
        t5_logits, clip_logits = probe(*text.encode(idx))
        return caption_probe_loss(t5_logits, targets[idx]) + caption_probe_loss(clip_logits, targets[idx])

    modules = {"text_encoder": text.clip, "text_encoder_2": text.t5, "probe": probe}
    return optimise("text_pretrain", modules, loss_fn, config.text_pretrain_steps, lr_at, gen, config, checkpoint,
                    budget, progress, log)


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
        x0, enc, pooled, t, eps = draw_flow_batch(gen, latents, caption_index, text, b, config.caption_dropout)
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


STATE_CONFIG_NAME = "build_config.json"
#: VAE-related fields: a VAE trained with equal values is the same VAE (see ``reuse_vae_from``).
_VAE_FIELDS = ("seed", "resolution", "num_images", "vae_steps", "vae_batch_size", "vae_learning_rate",
               "vae_kl_weight", "vae_mid_block_attention")
_VAE_FLUX_FIELDS = ("vae_block_out_channels", "latent_channels", "vae_norm_num_groups", "vae_layers_per_block")


def _vae_key(config: dict) -> str:
    return json.dumps({**{k: config.get(k) for k in _VAE_FIELDS},
                       **{k: config.get("flux", {}).get(k) for k in _VAE_FLUX_FIELDS}}, sort_keys=True)


def _open_state_dir(state_dir: Path, config: TeacherConfig) -> None:
    """Create ``state_dir`` for ``config``, or check that it already belongs to ``config``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    marker = state_dir / STATE_CONFIG_NAME
    if marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if _config_key(saved) != _config_key(config.to_dict()):
            raise ValueError(f"--state_dir {state_dir} holds a build with other settings ({marker}); resume it with "
                             "the same flags/recipe or choose an empty --state_dir")
    else:
        marker.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def _vae_stage(pipe, images, check_images, check_specs, config: TeacherConfig, state_dir: Path,
               reuse_vae_from: Optional[Path], progress: bool, log) -> tuple[dict, str]:
    """Train the VAE, or take it from ``state_dir`` (a resumed build) or ``reuse_vae_from``; it is kept in
    ``state_dir/vae`` with its report (reconstruction check and where it came from). Returns (report, source)."""
    import torch
    from diffusers import AutoencoderKL

    saved = state_dir / "vae"
    report_path = saved / "vae_report.json"
    if report_path.is_file() and (saved / "config.json").is_file():
        pipe.vae = AutoencoderKL.from_pretrained(saved).eval().requires_grad_(False)
        report = json.loads(report_path.read_text(encoding="utf-8"))
        return {k: v for k, v in report.items() if k != "source"}, report.get("source", "trained")
    if reuse_vae_from is not None:
        info = read_build_info(reuse_vae_from)
        if info is None or _vae_key(info.get("config", {})) != _vae_key(config.to_dict()):
            raise ValueError(f"--reuse_vae_from {reuse_vae_from}: its VAE was built with other VAE settings (or it "
                             f"has no {BUILD_INFO_NAME}); drop the flag to train the VAE")
        pipe.vae = AutoencoderKL.from_pretrained(Path(reuse_vae_from) / "vae").eval().requires_grad_(False)
        source = f"reused from {Path(reuse_vae_from).name} (same VAE settings)"
        report = {**vae_reconstruction_report(pipe.vae, check_images, check_specs),
                  "shift_factor": pipe.vae.config.shift_factor, "scaling_factor": pipe.vae.config.scaling_factor,
                  "final_l1": info.get("vae", {}).get("final_l1")}
    else:
        torch.manual_seed(config.seed)
        history = train_vae(pipe.vae, images, config, progress, log)
        shift, scale = vae_statistics(pipe.vae, images[:4096])
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        source = "trained"
        report = {**vae_reconstruction_report(pipe.vae, check_images, check_specs), "shift_factor": shift,
                  "scaling_factor": scale, "final_l1": history[-1]["l1"] if history else None}
    pipe.vae.save_pretrained(saved)
    report_path.write_text(json.dumps({**report, "source": source}, indent=2) + "\n", encoding="utf-8")
    return report, source


def build_teacher(output_dir: PathLike, config: Optional[TeacherConfig] = None, progress: bool = True,
                  evaluate: bool = True, state_dir: Optional[PathLike] = None, budget: Optional[Budget] = None,
                  reuse_vae_from: Optional[PathLike] = None) -> dict:
    """Build the teacher pipeline into ``output_dir`` (replacing it) and return the build report.

    Stages (times in the report): pipeline skeleton → VAE training → latent statistics and
    reconstruction check → latents/text embeddings of the training set → flow-matching training (with the
    text encoders when ``train_text_encoders``) → guidance distillation (``distill_steps``) → save (float16
    transformer) → reload and score ``eval_steps``-step samples of held-out prompts.

    With ``state_dir`` every stage keeps its resumable state there (VAE folder, ``flow.pt``,
    ``distill.pt``); a later call with the same config continues where the last one stopped, bit-identically.
    With ``budget`` the call stops when it runs out and returns ``{"status": "paused", ...}`` without
    writing ``output_dir``. ``reuse_vae_from``: take the VAE of a teacher folder built with the same VAE
    settings instead of training it again.
    """
    import torch
    from diffusers import FluxPipeline

    from data.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline
    from evaluation.shapes.domain import generate_examples
    from model.flux_io import FluxConditioner

    config = config or TeacherConfig()
    config.validate()
    if budget is not None and state_dir is None:
        raise ValueError("a time/step budget needs a state folder to resume from (pass --state_dir)")
    output_dir = Path(output_dir).resolve()
    flux_config = TinyFluxConfig(**{**config.flux, "axes_dims_rope": tuple(config.flux["axes_dims_rope"])})
    timings: dict[str, float] = {}
    started = time.perf_counter()
    tmp = _tmp_sibling(output_dir)
    state = Path(state_dir).resolve() if state_dir is not None else tmp / "state"
    _open_state_dir(state, config)
    log_lines: list[str] = []
    log_path = state / "train_log.jsonl"

    def log(entry: dict) -> None:
        line = json.dumps(entry)
        log_lines.append(line)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    try:
        # 1. skeleton: tokenizers, text encoders (random), scheduler, untrained VAE/transformer
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
        vae_report, vae_source = _vae_stage(pipe, images, check_images, check_specs, config, state,
                                            Path(reuse_vae_from) if reuse_vae_from else None, progress, log)
        if progress:
            print(f"VAE ({vae_source}): mean |error| {vae_report['mean_abs_error_8bit']:.2f}/255, scorer accuracy on "
                  f"reconstructions {100 * vae_report['scorer_accuracy_reconstructed']:.1f}%", file=sys.stderr)
        timings["vae_s"] = time.perf_counter() - t0

        # 4. latents + text (embeddings, or token ids when the encoders train) through the trainers' conditioner
        t0 = time.perf_counter()
        conditioner = FluxConditioner(pipe, "cpu", config.max_sequence_length)
        latents = _encode_latents(conditioner, images, progress=progress)
        lat_std = float(latents.std())
        unique = sorted(set(captions))
        caption_index = torch.tensor(_index_of(captions, unique), dtype=torch.long)
        txt_ids = conditioner.encode_prompts([UNCONDITIONAL_PROMPT])[2]
        img_ids = conditioner.image_ids(config.resolution, config.resolution)
        del images
        timings["encode_s"] = time.perf_counter() - t0

        # 5. caption-parsing pretraining of the text encoders (v3)
        if config.text_pretrain_steps:
            t0 = time.perf_counter()
            spec_of = {r["llava"]: json.loads(r["metadata"]) for r in rows}
            targets = torch.tensor([caption_targets(spec_of[c]) for c in unique] + [caption_targets(None)])
            pretrained = run_text_pretraining(TrainableText(pipe, unique, config.max_sequence_length), targets,
                                              config, state / "text.pt" if state_dir is not None else None,
                                              budget, progress, log)
            timings["text_pretrain_s"] = time.perf_counter() - t0
            if not pretrained.done:
                return _paused(state, "text_pretraining", pretrained)
            pipe.text_encoder.load_state_dict(pretrained.ema["text_encoder"])
            pipe.text_encoder_2.load_state_dict(pretrained.ema["text_encoder_2"])

        # 6. flow matching
        t0 = time.perf_counter()
        torch.manual_seed(config.seed)
        if config.adaln_zero_init:
            adaln_zero_init(pipe.transformer)
        modules = {"transformer": pipe.transformer}
        if config.train_text_encoders:
            text = TrainableText(pipe, unique, config.max_sequence_length)
            modules.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
        else:
            text = _frozen_text(conditioner, unique, progress)
        flow = run_flow_matching(modules, text, latents, caption_index, txt_ids, img_ids, config,
                                 state / "flow.pt" if state_dir is not None else None, budget, progress, log)
        timings["transformer_s"] = time.perf_counter() - t0
        if not flow.done:
            return _paused(state, "flow_matching", flow)
        for key, module in modules.items():
            module.load_state_dict(flow.ema[key])
            module.eval().requires_grad_(False)
        history = flow.history

        # 7. guidance distillation: the student (from the CFG teacher) takes the CFG scale as its guidance input
        if config.distill_steps:
            import copy

            t0 = time.perf_counter()
            teacher = copy.deepcopy(pipe.transformer)
            frozen = _frozen_text(conditioner, unique, progress)
            distilled = run_guidance_distillation(pipe.transformer, teacher, frozen, latents, caption_index, txt_ids,
                                                  img_ids, config,
                                                  state / "distill.pt" if state_dir is not None else None,
                                                  budget, progress, log)
            timings["distill_s"] = time.perf_counter() - t0
            if not distilled.done:
                return _paused(state, "guidance_distillation", distilled)
            pipe.transformer.load_state_dict(distilled.ema["transformer"])
            del teacher
            history = distilled.history

        # 8. save: float16 transformer (loaded back as float32 by diffusers), float32 elsewhere
        t0 = time.perf_counter()
        final = tmp / "pipeline"
        pipe.transformer.to(torch.float16)
        pipe.save_pretrained(final, safe_serialization=True)
        (final / "logs").mkdir()
        (final / "logs" / "teacher_train.jsonl").write_text(_full_log(log_path, log_lines), encoding="utf-8")
        timings["save_s"] = time.perf_counter() - t0

        # 9. score what was saved
        evaluation = None
        if evaluate and config.eval_prompts_per_tag > 0 and config.eval_samples > 0:
            t0 = time.perf_counter()
            stored = FluxPipeline.from_pretrained(final, dtype=torch.float32)
            evaluation = score_pipeline(stored, config, tmp / "eval", progress)
            evaluation.update({"steps": config.eval_steps, "guidance": config.eval_guidance,
                               "samples_per_prompt": config.eval_samples})
            if config.distill_steps:
                # the same images with the guidance input at 1 (no guidance): what the distillation adds
                plain = score_pipeline(stored, replace(config, eval_guidance=1.0), tmp / "eval_guidance_1", progress)
                evaluation["at_guidance_1"] = {"overall": plain["overall"],
                                               "tasks": {k: v["accuracy"] for k, v in plain["tasks"].items()}}
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
                            "final_loss_smoothed": history[-1]["loss_smoothed"] if history else None},
            "evaluation": evaluation,
        }
        if vae_source != "trained":
            info["vae_source"] = vae_source
        if state_dir is not None:
            info["timings_note"] = "timings of the last (resumed) call only; see the state folder's train_log.jsonl"
        (final / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _publish(final, output_dir)
        return info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def snapshot_pipeline(state_dir: PathLike, output_dir: PathLike) -> dict:
    """Write the EMA weights of an unfinished (or finished) staged build in ``state_dir`` as a
    ``FluxPipeline`` folder, to score a build between stages. Returns ``{"stage", "step", "total"}``.

    The latest stage with a checkpoint wins: ``distill.pt`` (guidance-distilled transformer) over
    ``flow.pt`` (CFG teacher; text encoders from it in both cases) over ``text.pt`` (pretrained text
    encoders only, with the untrained transformer: for :func:`evaluation.shapes.diagnose.text_binding_report`).
    """
    import torch
    from diffusers import AutoencoderKL, FluxPipeline

    from data.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline

    state_dir, output_dir = Path(state_dir), Path(output_dir)
    if not any((state_dir / name).is_file() for name in ("text.pt", "flow.pt")):
        raise ValueError(f"{state_dir} has no text.pt or flow.pt yet: nothing to snapshot")
    config = TeacherConfig(**json.loads((state_dir / STATE_CONFIG_NAME).read_text(encoding="utf-8")))
    flux_config = TinyFluxConfig(**{**config.flux, "axes_dims_rope": tuple(config.flux["axes_dims_rope"])})
    tmp = _tmp_sibling(output_dir)
    try:
        build_tiny_flux_pipeline(tmp / "skeleton", seed=config.seed, config=flux_config)
        pipe = FluxPipeline.from_pretrained(tmp / "skeleton", dtype=torch.float32)
        pipe.vae = AutoencoderKL.from_pretrained(state_dir / "vae")
        modules = {"transformer": pipe.transformer}
        if config.train_text_encoders:
            modules.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
        if (state_dir / "text.pt").is_file():  # pretrained encoders (kept as they are when frozen later)
            text = torch.load(state_dir / "text.pt", map_location="cpu", weights_only=False)
            probe = _caption_probe_class()(pipe.text_encoder_2.config.d_model, pipe.text_encoder.config.hidden_size)
            _load_ema({"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2, "probe": probe},
                      text)
            stage, step, total = "text_pretraining", text["step"], config.text_pretrain_steps
        if (state_dir / "flow.pt").is_file():  # the transformer (and the encoders when trained jointly)
            flow = torch.load(state_dir / "flow.pt", map_location="cpu", weights_only=False)
            _load_ema(modules, flow)
            stage, step, total = "flow_matching", flow["step"], config.steps
        if (state_dir / "distill.pt").is_file():
            distill = torch.load(state_dir / "distill.pt", map_location="cpu", weights_only=False)
            _load_ema({"transformer": pipe.transformer}, distill)
            stage, step, total = "guidance_distillation", distill["step"], config.distill_steps
        pipe.transformer.to(torch.float16)
        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
        _publish(tmp / "pipeline", output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"stage": stage, "step": step, "total": total}


def _load_ema(modules: dict, checkpoint: dict) -> None:
    """Load an :func:`optimise` checkpoint's EMA into ``modules`` (the same modules, in the same order)."""
    import torch

    for key, module in modules.items():
        module.load_state_dict(checkpoint["modules"][key])
    params = [p for m in modules.values() for p in m.parameters()]
    with torch.no_grad():
        for p, e in zip(params, checkpoint["ema"], strict=True):
            p.copy_(e)


def _index_of(captions: Sequence[str], unique: Sequence[str]) -> list[int]:
    lookup = {c: i for i, c in enumerate(unique)}
    return [lookup[c] for c in captions]


def _frozen_text(conditioner, unique: Sequence[str], progress: bool) -> FrozenText:
    """Precomputed embeddings of the (sorted) unique captions and of the unconditional prompt."""
    embeds, pooled, _ = _encode_captions(conditioner, unique, progress=progress)
    uncond_embeds, uncond_pooled, _ = conditioner.encode_prompts([UNCONDITIONAL_PROMPT])
    return FrozenText(embeds, pooled, uncond_embeds, uncond_pooled)


def _full_log(log_path: Path, fallback: Sequence[str]) -> str:
    lines = log_path.read_text(encoding="utf-8").splitlines() if log_path.is_file() else list(fallback)
    return "\n".join(lines) + "\n"


def _paused(state: Path, stage: str, result: StageResult) -> dict:
    info = {"status": "paused", "stage": stage, "step": result.step, "total": result.total,
            "state_dir": str(state), "loss_smoothed": result.history[-1]["loss_smoothed"] if result.history else None}
    (state / "progress.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _config_key(config: dict) -> str:
    """Fields that change the weights (evaluation settings excluded). Fields missing from ``config``
    (build infos written before they existed) take their defaults, which reproduce the older builds."""
    defaults = TeacherConfig().to_dict()
    full = {**defaults, **config}
    return json.dumps({k: v for k, v in full.items() if not k.startswith("eval_")}, sort_keys=True)


def ensure_teacher(output_dir: PathLike, config: Optional[TeacherConfig] = None, force: bool = False,
                   progress: bool = True, evaluate: bool = True, state_dir: Optional[PathLike] = None,
                   budget: Optional[Budget] = None, reuse_vae_from: Optional[PathLike] = None
                   ) -> tuple[Path, dict, bool]:
    """Reuse the teacher in ``output_dir`` when it was built with ``config``; else (or with ``force``)
    build it (see :func:`build_teacher` for the other arguments). Returns ``(folder, build_info, rebuilt)``;
    a build stopped by ``budget`` returns the ``{"status": "paused"}`` report as ``build_info``."""
    config = config or teacher_recipe()
    folder = Path(output_dir).resolve()
    info = read_build_info(folder)
    if (not force and info is not None and (folder / "model_index.json").is_file()
            and _config_key(info.get("config", {})) == _config_key(config.to_dict())):
        return folder, info, False
    return folder, build_teacher(folder, config, progress, evaluate, state_dir, budget, reuse_vae_from), True


# --------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.shapes.teacher",
        description="Build (train) the shapes-world FLUX teacher pipeline: a VAE trained on rendered shapes, CLIP/T5 "
                    "text encoders (random and frozen in recipe v1; trained with the transformer in v2; in v3 first "
                    "pretrained to parse the captions; in v4 pretrained, then frozen), a FluxTransformer2DModel "
                    "trained by flow matching (v2-v4: with caption dropout, then guidance-distilled as FLUX-dev). Writes a FluxPipeline folder with "
                    f"{BUILD_INFO_NAME} (timings, VAE reconstruction check, held-out score). Long builds run in "
                    "stages: give --state_dir and --max_minutes, and run the same command again to continue.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", required=True, help="pipeline folder to write (replaced atomically when done)")
    p.add_argument("--recipe", choices=RECIPES, default=COMMITTED_RECIPE,
                   help="build recipe (see teacher_recipe); the default is the committed teacher's")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice of the build (default: 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, i.e. OMP_NUM_THREADS); the same seed and thread "
                        "count give identical weights. On a busy machine use 1: two threads that wait for each "
                        "other can run many times slower than one")
    for name, kind, text in (("num_images", int, "rendered training images"),
                             ("vae_steps", int, "VAE optimizer steps"),
                             ("steps", int, "flow-matching optimizer steps of the transformer"),
                             ("batch_size", int, "flow-matching batch size"),
                             ("learning_rate", float, "flow-matching peak LR"),
                             ("distill_steps", int, "guidance-distillation steps (0: none)"),
                             ("text_pretrain_steps", int, "caption-parsing pretraining steps of the text encoders "
                                                         "(0: none)"),
                             ("eval_prompts_per_tag", int, "held-out prompts per GenEval tag scored after the build "
                                                          "(0: skip scoring)"),
                             ("eval_samples", int, "samples per held-out prompt")):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{text} (default: the recipe's)")
    p.add_argument("--state_dir", default=None,
                   help="folder for the resumable state of every stage (VAE, flow.pt, distill.pt); the same command "
                        "with the same folder continues an interrupted or --max_minutes-stopped build exactly")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="stop after this many minutes of training in this call, saving the state (needs --state_dir)")
    p.add_argument("--max_steps_per_call", type=int, default=None,
                   help="stop after this many optimizer steps in this call, saving the state (needs --state_dir)")
    p.add_argument("--reuse_vae_from", default=None,
                   help="teacher folder whose VAE was built with the same VAE settings: use it instead of training "
                        "the VAE again (recorded in the build info)")
    p.add_argument("--snapshot_from", default=None,
                   help="instead of training, write OUTPUT_DIR from the EMA weights in this --state_dir folder (to "
                        "score an unfinished staged build, e.g. with python -m evaluation.shapes.diagnose)")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUTPUT_DIR when it already holds a teacher built with the same settings")
    p.add_argument("--no_progress", action="store_true", help="disable progress bars")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TeacherConfig:
    """The recipe's config with the command-line overrides."""
    config = teacher_recipe(args.recipe)
    overrides = {k: getattr(args, k) for k in ("seed", "num_images", "vae_steps", "steps", "batch_size",
                                                "learning_rate", "distill_steps", "text_pretrain_steps",
                                                "eval_prompts_per_tag",
                                                "eval_samples") if getattr(args, k) is not None}
    return replace(config, **overrides)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    config = config_from_args(args)
    budget = None
    if args.max_minutes is not None or args.max_steps_per_call is not None:
        if args.state_dir is None:
            print("error: --max_minutes/--max_steps_per_call need --state_dir (where the build resumes from)",
                  file=sys.stderr)
            return 2
        budget = Budget(args.max_minutes, args.max_steps_per_call)
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
    if args.snapshot_from is not None:
        try:
            where = snapshot_pipeline(args.snapshot_from, out)
        except (ValueError, OSError) as exc:
            print(f"error: --snapshot_from: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {out} from {args.snapshot_from}: {where['stage']} step {where['step']}/{where['total']}")
        return 0
    try:
        folder, info, rebuilt = ensure_teacher(out, config, force=not args.reuse, progress=not args.no_progress,
                                               state_dir=args.state_dir, budget=budget,
                                               reuse_vae_from=args.reuse_vae_from)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if info.get("status") == "paused":
        print(f"paused in {info['stage']} at step {info['step']}/{info['total']}; state in {info['state_dir']} "
              "(run the same command again to continue)")
        return 0
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
    from training.cli import run_cli

    sys.exit(run_cli(main))  # bad input: one line, status 2
