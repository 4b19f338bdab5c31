"""What a teacher build is: :class:`TeacherConfig`, the named recipes v1–v7 and the keys that tell whether two
configs give the same weights (or the same VAE)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from evaluation.shapes.domain import TAGS


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
    # written before they existed has the same key as TeacherConfig() (see config_key).
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
    #: Shift of the training flow times (flow matching and guidance distillation), t ↦ s·t / (1 + (s − 1)·t):
    #: SD3's timestep shift. s > 1 draws more of the high-noise times where the layout is decided (the v4
    #: relation-swap gap peaks at t = 0.9); 1 draws them unshifted, as v1–v5 did (bit-identically).
    flow_time_shift: float = 1.0
    #: Draw weights of the training rows in flow matching by GenEval tag, e.g. {"position": 4, "counting": 2}
    #: (tags not named weigh 1; empty: uniform rows, as v1–v6 drew them, bit-identically). The position pilots
    #: (teacher_diagnosis.md, run B) fine-tuned with these weights; guidance distillation keeps uniform rows.
    flow_tag_weights: dict = field(default_factory=dict)
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
        unknown = sorted(set(self.flow_tag_weights) - set(TAGS))
        if unknown:
            raise ValueError(f"flow_tag_weights names unknown tags {unknown}; known: {list(TAGS)}")
        weights = [self.flow_tag_weights.get(tag, 1.0) for tag in TAGS]  # tags not named weigh 1
        if not all(0 <= w < float("inf") for w in weights) or not any(weights):
            raise ValueError("flow_tag_weights must be finite and >= 0, with some tag > 0; "
                             f"got {self.flow_tag_weights}")
        if not self.flow_time_shift > 0:
            raise ValueError(f"flow_time_shift must be > 0, got {self.flow_time_shift}")
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
#: v5: v4 with 2 attention heads of 64 and RoPE axes (8, 28, 28) instead of 4 of 32 and (8, 12, 12): same width,
#: three to four RoPE frequency pairs per axis that turn usefully across the 8 x 8 token grid instead of one or two
#: (v4 places objects almost blind to the relation). Measured 2026-12-06: no better at the relation and 4.6 points
#: worse overall than v4, so v4 stays committed (docs/toy_benchmark/teacher_diagnosis.md).
#: v6: v4 with training flow times shifted towards high noise (flow_time_shift 3), where the layout is decided.
#: Measured 2026-12-06: its denoiser reads the relation (swap gap 4.6 % at t = 0.9, v4 0.8 %), position +16 points
#: over v4 on the same images, overall not separated (+1.9); committed since (docs/toy_benchmark/teacher_diagnosis.md).
#: v7: v6 drawing position rows 4 times and counting rows twice as often in flow matching (the weights of the
#: position pilots' run B), now that v6's denoiser reads the relation. Measured 2026-12-06: swap gap 51 % at t = 0.9,
#: build evaluation 77.9 % (v6 69.1), position 71 (v6 37); committed since (docs/toy_benchmark/teacher_diagnosis.md).
RECIPES = ("v1", "v2", "v3", "v4", "v5", "v6", "v7")
#: The recipe of the teacher committed in assets/shapes_teacher (what ``--rebuild_teacher`` remakes).
COMMITTED_RECIPE = "v7"


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
    if name == "v5":  # stages before flow matching read no transformer field: v4's text.pt and VAE are v5's
        v4 = teacher_recipe("v4")
        return replace(v4, flux={**v4.flux, "num_attention_heads": 2, "attention_head_dim": 64,
                                 "axes_dims_rope": [8, 28, 28]})
    if name == "v6":  # like v5, v4's text.pt and VAE carry over (the shift acts from flow matching on)
        return replace(teacher_recipe("v4"), flow_time_shift=3.0)
    if name == "v7":  # v6's text.pt and VAE carry over (the weights act from flow matching on)
        return replace(teacher_recipe("v6"), flow_tag_weights={"position": 4.0, "counting": 2.0})
    raise ValueError(f"unknown teacher recipe {name!r}; choose one of {', '.join(RECIPES)}")


#: VAE-related fields: a VAE trained with equal values is the same VAE (see ``reuse_vae_from``).
VAE_FIELDS = ("seed", "resolution", "num_images", "vae_steps", "vae_batch_size", "vae_learning_rate",
              "vae_kl_weight", "vae_mid_block_attention")
VAE_FLUX_FIELDS = ("vae_block_out_channels", "latent_channels", "vae_norm_num_groups", "vae_layers_per_block")


def vae_key(config: dict) -> str:
    """The VAE-determining fields of a config dict, as a comparable string."""
    return json.dumps({**{k: config.get(k) for k in VAE_FIELDS},
                       **{k: config.get("flux", {}).get(k) for k in VAE_FLUX_FIELDS}}, sort_keys=True)


def config_key(config: dict) -> str:
    """Fields that change the weights (evaluation settings excluded). Fields missing from ``config``
    (build infos written before they existed) take their defaults, which reproduce the older builds."""
    defaults = TeacherConfig().to_dict()
    full = {**defaults, **config}
    return json.dumps({k: v for k, v in full.items() if not k.startswith("eval_")}, sort_keys=True)


def tiny_flux_config(config: TeacherConfig):
    """The :class:`data.tiny_flux.TinyFluxConfig` of ``config.flux`` (JSON turns its RoPE axes into a list)."""
    from data.tiny_flux import TinyFluxConfig

    return TinyFluxConfig(**{**config.flux, "axes_dims_rope": tuple(config.flux["axes_dims_rope"])})
