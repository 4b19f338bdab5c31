"""Few-step FLUX samplers: sCM (TrigFlow consistency) and MeanFlow students, and the teacher.

Both student pipelines subclass diffusers' :class:`~diffusers.FluxPipeline` and reuse everything that
is not the sampling loop: ``check_inputs``, ``encode_prompt`` (CLIP pooled + T5 at
``max_sequence_length``), ``prepare_latents`` (noise drawn unpacked, then 2×2-packed, with per-image
generators), ``_unpack_latents``, the VAE shift/scale and the ``VaeImageProcessor``.  Only
``__call__`` is overridden.  The teacher is diffusers' own ``FluxPipeline`` with our transformer
(:func:`load_teacher_pipeline`): FluxPipeline calls the transformer with ``timestep = σ`` in [0, 1]
(it divides the scheduler's ×1000 timesteps by 1000) and passes the guidance scale unchanged, and
:class:`~model.transformer.DistillFluxTransformer2DModel` multiplies both by its own
``timestep_scale`` — so the same pipeline drives a stock (×1000) and a rescaled (×1) teacher.

Latents: z is FLUX's normalised latent (VAE mean − shift)·scale, packed to [B, HW/4, 4C].

**sCM** (:class:`SCMFluxPipeline`, diffusers' ``SCMScheduler`` with ``prediction_type="trigflow"``).
TrigFlow state x_t = cos t·x₀ + sin t·z with x₀ = σ_d·z_data, z ~ N(0, σ_d²), t ∈ [0, π/2]::

    x_{t₀} = σ_d·ε₀,                       t₀ = max_timesteps (π/2 ≈ 1.5708)
    x̂₀    = cos tᵢ·x_{tᵢ} − sin tᵢ·σ_d·F_θ(x_{tᵢ}/σ_d, tᵢ)      (consistency jump to t = 0)
    x_{tᵢ₊₁} = cos tᵢ₊₁·x̂₀ + sin tᵢ₊₁·σ_d·εᵢ₊₁                 (fresh noise, εᵢ₊₁ ~ N(0, I))
    image latent = x̂₀/σ_d   after the last step (tᴺ = 0)

F_θ is :class:`model.trigflow.TrigFlowFlux` (the training-time flow → TrigFlow conversion), guidance
is the guidance embedding.  Time grid: 1 step [t₀, 0]; 2 steps [t₀, ``intermediate_timesteps``
(1.3, the original), 0]; N ≠ 2 steps: ``SCMScheduler``'s own grid, linear in t from t₀ to 0
(``linspace(t₀, 0, N + 1)``); any other grid via ``timesteps=``.

**MeanFlow** (:class:`MeanFlowFluxPipeline`).  The student predicts the average velocity
u(z_t, r, t) ≈ (1/(t − r))∫_r^t v dτ and is called as ``transformer(z_t, timestep=t,
interval=t − r, guidance=w)``.  One jump per step on a descending grid 1 = t₀ > t₁ > … > t_N = 0::

    z_{tᵢ₊₁} = z_{tᵢ} − (tᵢ − tᵢ₊₁)·u(z_{tᵢ}, tᵢ₊₁, tᵢ)

Default grid (``time_schedule="flux"``, as the original): FLUX's resolution-shifted sigmas — σ =
linspace(1, 1/N, N) mapped by the scheduler's shift with μ = ``calculate_shift(image_seq_len)``, then
0 appended (512², 4 steps: 1, .849, .653, .385, 0).  ``time_schedule="uniform"``: linspace(1, 0, N+1).

Loading: ``Pipeline.from_checkpoint(pretrained, checkpoint)`` for a training export
(``ckpts/transformer_<step>.pt``: {'module', 'config', 'step'}, or the original release's
{'module'} only), ``Pipeline.from_pretrained(folder)`` for a folder written by
``export_diffusers.py``.  Such a folder also loads in plain diffusers, without this repository:
it ships this package's sampling modules (:data:`REMOTE_CODE_MODULES`) as diffusers "remote code"
— ``model_index.json`` names ``["pipeline", "SCMFluxPipeline"]`` and the transformer as
``["transformer", "DistillFluxTransformer2DModel"]`` with ``transformer/transformer.py`` — so
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` runs the shipped copies.  Our
classes' ``from_pretrained`` reads the same folder with this repository's code instead (no code
from the folder is executed).  That is why the modules below import each other relatively.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SCMScheduler)
# Folders saved before the transformer's own module exposed ModelMixin name this module as the transformer's
# library in model_index.json; diffusers' loader finds the class and its loader base class here.
from diffusers import ModelMixin  # noqa: F401
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .flux_io import check_resolution
from .loading import (CheckpointError, LoadedCheckpoint, check_timestep_scale, load_flux_transformer,
                           load_state_dict_strict, read_checkpoint)
from .lora import ADAPTER_NAME, LORA_WEIGHTS, has_lora, is_lora_folder, load_lora_student, read_lora_folder
from .transformer import STOCK_TIMESTEP_SCALE, DistillFluxTransformer2DModel
from .trigflow import FluxInputs, TrigFlowFlux, flow_velocity, trig_to_flow_time

SCM_SIGMA_DATA = 0.5
#: The original's start time (diffusers' SCMScheduler default): π/2 rounded up, flow time s ≈ 1 + 4e-6.
SCM_MAX_TIMESTEP = 1.5708
#: The original's middle time for 2-step sampling.
SCM_INTERMEDIATE_TIMESTEP = 1.3
#: Time-grid choices of the MeanFlow sampler.
MEANFLOW_SCHEDULES = ("flux", "uniform")
#: Which sampling method a checkpoint may be used with.
METHODS = ("scm", "meanflow", "teacher")

INTERVAL_PREFIX = "time_text_embed.interval_embedder."
#: Modules of this package an exported folder ships for diffusers' trust_remote_code loading: the pipeline
#: module and everything it imports (diffusers copies the direct relative imports of the entry file).
REMOTE_CODE_MODULES = ("pipeline", "flux_io", "loading", "lora", "trigflow", "transformer")
#: model_index.json entries of an exported folder (library = shipped module file, class).
REMOTE_TRANSFORMER_ENTRY = ["transformer", DistillFluxTransformer2DModel.__name__]
LOCAL_TRANSFORMER_ENTRY = [DistillFluxTransformer2DModel.__module__, DistillFluxTransformer2DModel.__name__]
LOGVAR_PREFIX = "logvar_linear."
_STEP_FROM_NAME = re.compile(r"(\d+)\.(?:pt|pth|bin|safetensors)$")


# ---------------------------------------------------------------------------------------------------
# Loading students and teachers
# ---------------------------------------------------------------------------------------------------


def checkpoint_step(ckpt: LoadedCheckpoint) -> int | None:
    """Training step of a checkpoint: its own ``step`` field, else parsed from ``transformer_<step>.pt``."""
    if ckpt.step is not None:
        return int(ckpt.step)
    match = _STEP_FROM_NAME.search(Path(ckpt.path).name)
    return int(match.group(1)) if match else None


def _method_error(method: str, path: str, has_interval: bool, has_logvar: bool) -> str | None:
    """Why a checkpoint with these keys cannot be sampled by ``method`` (None when it can)."""
    if method == "meanflow" and not has_interval:
        hint = (" It has an sCM logvar head (logvar_linear.*): sample it with test_sCM.py." if has_logvar else
                " MeanFlow students have time_text_embed.interval_embedder.* weights; is this a teacher or an sCM student?")
        return f"{path} is not a MeanFlow student: it has no interval (t - r) embedder.{hint}"
    if method in ("scm", "teacher") and has_interval:
        return (f"{path} is a MeanFlow student (it has an interval (t - r) embedder, time_text_embed.interval_embedder.*): "
                "sample it with test_meanflow.py / MeanFlowFluxPipeline.")
    if method == "teacher" and has_logvar:
        return f"{path} is an sCM student (it has a logvar_linear head): sample it with test_sCM.py / SCMFluxPipeline."
    return None


def _transformer_config(pretrained: str, revision: str | None) -> dict:
    """config.json of a pipeline's ``transformer/`` (or of a bare transformer folder)."""
    local = Path(pretrained)
    subfolder = "transformer"
    if local.exists() and not (local / subfolder).exists():
        subfolder = None
    try:
        return dict(DistillFluxTransformer2DModel.load_config(pretrained, subfolder=subfolder, revision=revision))
    except OSError as exc:
        raise CheckpointError(f"cannot read the transformer config of {pretrained!r} ({exc}). Pass a FLUX pipeline "
                              "folder or hub id as --pretrained_model_name_or_path.") from exc


def load_student_transformer(checkpoint_path: str | os.PathLike, pretrained_model_name_or_path: str | None = None, *,
                             method: str, timestep_scale: float | None = None, dtype: torch.dtype = torch.float32,
                             revision: str | None = None, lora_base: str | None = None,
                             fuse_lora: bool = False) -> tuple[DistillFluxTransformer2DModel, LoadedCheckpoint]:
    """Build the transformer a checkpoint describes and load its weights strictly.

    The architecture comes from the checkpoint's own ``config`` (our exports) or, for the original
    release's ``{'module': ...}`` files, from ``pretrained_model_name_or_path``'s transformer config
    with ``timestep_scale`` (default 1: the release's students are ×1 models).  ``interval_embedding``
    follows the weights.  The model is built on the meta device and materialised once, so an 8B
    checkpoint is not preceded by an 8B random initialisation.  ``method`` ("scm", "meanflow",
    "teacher") rejects checkpoints of the other method with an error that says which tool to use.

    A LoRA export folder (``ckpts/lora_<step>/``) is applied to its base (see :func:`model.lora.load_lora_student`;
    ``lora_base`` replaces the rescaled teacher it records), unfused unless ``fuse_lora``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if is_lora_folder(checkpoint_path):
        return _load_lora_student(checkpoint_path, pretrained_model_name_or_path, method, timestep_scale, dtype,
                                  revision, lora_base, fuse_lora)
    ckpt = read_checkpoint(checkpoint_path)
    has_interval = any(k.startswith(INTERVAL_PREFIX) for k in ckpt.state_dict)
    has_logvar = any(k.startswith(LOGVAR_PREFIX) for k in ckpt.auxiliary)
    problem = _method_error(method, ckpt.path, has_interval, has_logvar)
    if problem:
        raise CheckpointError(problem)
    if ckpt.config is not None:
        if timestep_scale is not None:
            check_timestep_scale(ckpt, timestep_scale)
        config = dict(ckpt.config)
        config.setdefault("timestep_scale", STOCK_TIMESTEP_SCALE)
    else:
        if pretrained_model_name_or_path is None:
            raise CheckpointError(f"{ckpt.path} carries no transformer config (the original release's format): pass "
                                  "the FLUX pipeline it was trained from (--pretrained_model_name_or_path).")
        config = _transformer_config(pretrained_model_name_or_path, revision)
        config["timestep_scale"] = 1.0 if timestep_scale is None else float(timestep_scale)
    config["interval_embedding"] = has_interval
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = DistillFluxTransformer2DModel.from_config(config)
    # Materialise uninitialised storage in the target dtype; every tensor is then overwritten by the
    # strict load (FLUX has no buffers outside the state dict, so nothing stays uninitialised).
    # (nn.Module.to, not ModelMixin.to: the latter warns about fp32-pinned modules FLUX does not have.)
    transformer = torch.nn.Module.to(transformer, dtype=dtype).to_empty(device="cpu")
    try:
        load_state_dict_strict(transformer, ckpt.state_dict, source=ckpt.path)
    except CheckpointError as exc:
        if ckpt.config is not None:
            raise
        # The architecture came from the teacher pipeline, so a teacher of another size is the likely cause.
        raise CheckpointError(f"{exc} {ckpt.path} carries no config (the original release's {{'module': ...}} "
                              f"format), so its architecture was read from {pretrained_model_name_or_path}: pass the "
                              "FLUX pipeline it was distilled from as --pretrained_model_name_or_path (Freepik/"
                              "flux.1-lite-8B for the released students).") from exc
    transformer.eval().requires_grad_(False)
    return transformer, ckpt


def _load_lora_student(path, pretrained, method, timestep_scale, dtype, revision, lora_base, fuse):
    folder = read_lora_folder(path)
    has_interval = any(k.startswith(INTERVAL_PREFIX) for k in folder.heads)
    problem = _method_error(method, str(path), has_interval, any(k.startswith(LOGVAR_PREFIX) for k in folder.heads))
    if problem:
        raise CheckpointError(problem)
    transformer, folder = load_lora_student(path, pretrained, base_checkpoint=lora_base, dtype=dtype, revision=revision,
                                            fuse=fuse)
    if timestep_scale is not None and float(timestep_scale) != transformer.timestep_scale:
        raise CheckpointError(f"{path} was trained at timestep_scale={transformer.timestep_scale:g}, not {timestep_scale:g}")
    return transformer, LoadedCheckpoint({}, dict(transformer.config), folder.info.get("step"), str(path))


def load_teacher_pipeline(pretrained_model_name_or_path: str, checkpoint_path: str | os.PathLike | None = None, *,
                          timestep_scale: float | None = None, dtype: torch.dtype = torch.float32,
                          revision: str | None = None) -> FluxPipeline:
    """diffusers' own ``FluxPipeline`` around our transformer (the teacher sampler; no copy of FLUX).

    Without ``checkpoint_path`` the pipeline's transformer is loaded with the ``timestep_scale`` its
    config records (1000 for stock FLUX); with it, the weights (e.g. a rescaled ×1 teacher) come from
    the checkpoint.  With timestep_scale 1000 the result is bit-identical to stock ``FluxPipeline``.
    """
    if checkpoint_path is None:
        saved = float(_transformer_config(pretrained_model_name_or_path, revision).get("timestep_scale", STOCK_TIMESTEP_SCALE))
        if timestep_scale is not None and float(timestep_scale) != saved:
            raise CheckpointError(
                f"{pretrained_model_name_or_path}'s transformer uses timestep_scale={saved:g}; its weights are not valid "
                f"at timestep_scale={float(timestep_scale):g}. Pass the rescaled weights with --resume_path, or drop --timestep_scale.")
        transformer = load_flux_transformer(pretrained_model_name_or_path, saved, revision=revision, dtype=dtype)
    else:
        transformer, _ = load_student_transformer(checkpoint_path, pretrained_model_name_or_path, method="teacher",
                                                  timestep_scale=timestep_scale, dtype=dtype, revision=revision)
    transformer.eval().requires_grad_(False)
    # transformer=None, then registered: diffusers would otherwise check the passed transformer against the
    # library model_index.json names, which for an exported folder is its shipped module (not importable here).
    pipe = FluxPipeline.from_pretrained(pretrained_model_name_or_path, transformer=None, revision=revision, dtype=dtype)
    pipe.register_modules(transformer=transformer)
    return pipe


# ---------------------------------------------------------------------------------------------------
# Time grids
# ---------------------------------------------------------------------------------------------------


def meanflow_time_grid(num_steps: int, image_seq_len: int, scheduler_config: dict | None = None,
                       schedule: str = "flux") -> torch.Tensor:
    """Descending flow times [t₀ = 1, …, t_N = 0] (float32, length N + 1) of the MeanFlow sampler.

    "flux": FLUX's sampling sigmas for N steps — linspace(1, 1/N, N) shifted by the pipeline's
    ``FlowMatchEulerDiscreteScheduler`` (μ = calculate_shift(image_seq_len) with dynamic shifting,
    σ' = e^μ/(e^μ + 1/σ − 1)) — then 0.  "uniform": linspace(1, 0, N + 1).
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    if schedule == "uniform":
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
    if schedule != "flux":
        raise ValueError(f"unknown MeanFlow time schedule {schedule!r}; choose from {MEANFLOW_SCHEDULES}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config or {})
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.to(torch.float32).cpu()


def _as_time_list(timesteps: Any) -> list[float]:
    values = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if len(values) < 2 or any(b >= a for a, b in zip(values, values[1:])) or values[-1] != 0.0:
        raise ValueError(f"timesteps must be strictly decreasing and end at 0, got {values}")
    return values


# ---------------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------------


class _FewStepFluxPipeline(FluxPipeline):
    """FluxPipeline with a student transformer and a few-step ``__call__`` (see module doc)."""

    method: str = ""
    #: What ``callback_on_step_end`` may read and replace: the sampler state after each step.
    _callback_tensor_inputs = ["latents"]

    def __init__(self, scheduler, vae, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 text_encoder_2: T5EncoderModel, tokenizer_2: T5TokenizerFast,
                 transformer: FluxTransformer2DModel, image_encoder=None, feature_extractor=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def default_scheduler(cls, base_config: dict | None):
        """The scheduler this pipeline samples with, given the source pipeline's scheduler config."""
        raise NotImplementedError

    @classmethod
    def check_transformer(cls, transformer: Any, source: str = "transformer") -> None:
        """Raise :class:`CheckpointError` when ``transformer`` is not a student of this pipeline's method."""
        if transformer is None:
            return
        has_interval = bool(getattr(getattr(transformer, "config", None), "interval_embedding", False))
        problem = _method_error(cls.method, source, has_interval, has_logvar=False)
        if problem:
            raise CheckpointError(problem)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' config reader; an exported folder's remote-code entries are read as this repository's classes.

        ``["pipeline", "<ours>"]`` (the shipped pipeline module) becomes our class name and the shipped
        transformer module ``model.transformer``, so ``from_pretrained`` in this repository neither needs
        ``trust_remote_code`` nor runs the folder's copies of our code.
        """
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config, dict) and list(config.get("_class_name") or []) == ["pipeline", cls.__name__]:
            config["_class_name"] = cls.__name__
            if list(config.get("transformer") or []) == REMOTE_TRANSFORMER_ENTRY:
                config["transformer"] = list(LOCAL_TRANSFORMER_ENTRY)
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """diffusers' loader, plus a check that the transformer is a student of this method."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        cls.check_transformer(pipe.transformer, str(pretrained_model_name_or_path))
        return pipe

    def register_to_config(self, **kwargs):
        super().register_to_config(**kwargs)
        # diffusers' DiffusionPipeline.from_pretrained (ours, or plain diffusers with trust_remote_code) ends with
        # register_to_config(_name_or_path=folder): the moment to apply the adapter export_diffusers.py put beside
        # a LoRA student's base transformer, whichever loader was used.
        folder = kwargs.get("_name_or_path")
        if folder is not None and (Path(folder) / LORA_WEIGHTS).is_file() and not has_lora(self.transformer):
            self.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS, adapter_name=ADAPTER_NAME)

    @classmethod
    def from_checkpoint(cls, pretrained_model_name_or_path: str, checkpoint_path: str | os.PathLike, *,
                        timestep_scale: float | None = None, dtype: torch.dtype = torch.float32,
                        revision: str | None = None, lora_base: str | None = None, **scheduler_overrides):
        """Pipeline = ``pretrained_model_name_or_path``'s VAE/encoders/tokenizers + the student of a training
        export (``.pt`` with 'module' [+ 'config', 'step'], ``.safetensors``, a transformer folder, or a LoRA
        folder ``ckpts/lora_<step>/`` applied to its base; ``lora_base`` overrides the base it records).

        The teacher's transformer weights are not loaded.  ``scheduler_overrides`` go to the scheduler
        (e.g. ``sigma_data`` for sCM).  The checkpoint's step is kept in ``pipe.checkpoint_step``.
        ``pretrained_model_name_or_path`` may also be a loaded pipeline (e.g. the teacher's ``FluxPipeline``):
        its VAE, text encoders and tokenizers are then shared, not loaded again.
        """
        if isinstance(pretrained_model_name_or_path, DiffusionPipeline):
            return cls._from_pipeline(pretrained_model_name_or_path, checkpoint_path, timestep_scale=timestep_scale,
                                      dtype=dtype, revision=revision, lora_base=lora_base, **scheduler_overrides)
        transformer, ckpt = load_student_transformer(checkpoint_path, pretrained_model_name_or_path, method=cls.method,
                                                     timestep_scale=timestep_scale, dtype=dtype, revision=revision,
                                                     lora_base=lora_base)
        base = FlowMatchEulerDiscreteScheduler.load_config(pretrained_model_name_or_path, subfolder="scheduler",
                                                           revision=revision)
        scheduler = cls.default_scheduler(dict(base))
        if scheduler_overrides:
            scheduler = type(scheduler).from_config({**scheduler.config, **scheduler_overrides})
        pipe = super().from_pretrained(pretrained_model_name_or_path, transformer=transformer, scheduler=scheduler,
                                       revision=revision, dtype=dtype)
        pipe.checkpoint_step = checkpoint_step(ckpt)
        return pipe

    @classmethod
    def _from_pipeline(cls, source: DiffusionPipeline, checkpoint_path: str | os.PathLike, *, timestep_scale, dtype,
                       revision, lora_base, **scheduler_overrides):
        """:meth:`from_checkpoint` around a loaded pipeline's components (what a diffusers user passes)."""
        missing = [name for name in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
                   if getattr(source, name, None) is None]
        if missing:
            raise ValueError(f"{type(source).__name__} has no {', '.join(missing)}: pass a FLUX pipeline (or its folder "
                             "or hub id) as the first argument of from_checkpoint")
        # Original-release files carry no transformer config: it comes from where the pipeline was loaded.
        name_or_path = source.config.get("_name_or_path") or None
        transformer, ckpt = load_student_transformer(checkpoint_path, name_or_path, method=cls.method,
                                                     timestep_scale=timestep_scale, dtype=dtype, revision=revision,
                                                     lora_base=lora_base)
        scheduler = cls.default_scheduler(dict(source.scheduler.config))
        if scheduler_overrides:
            scheduler = type(scheduler).from_config({**scheduler.config, **scheduler_overrides})
        pipe = cls(scheduler=scheduler, vae=source.vae, text_encoder=source.text_encoder, tokenizer=source.tokenizer,
                   text_encoder_2=source.text_encoder_2, tokenizer_2=source.tokenizer_2,
                   transformer=transformer.to(source.device))
        pipe.checkpoint_step = checkpoint_step(ckpt)
        return pipe

    # -- shared pieces of __call__ ---------------------------------------------------------------------

    def _prepare(self, prompt, prompt_2, height, width, num_inference_steps, num_images_per_prompt, generator,
                 latents, prompt_embeds, pooled_prompt_embeds, guidance_scale, max_sequence_length,
                 joint_attention_kwargs=None, callback_tensor_inputs=None) -> tuple[torch.Tensor, FluxInputs, int, int]:
        """Checks, text encoding, unit-variance packed noise [B, N, 4C] (float32) and the FLUX inputs.

        ``joint_attention_kwargs`` go to every transformer call; its ``"scale"`` is also the text encoders'
        LoRA scale, as in FluxPipeline.
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        for side in (height, width):
            # FluxPipeline only warns and silently changes the size; a sampler for evaluation must not.
            check_resolution(int(side), self.vae_scale_factor)
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        self.check_inputs(prompt, prompt_2, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds, max_sequence_length=max_sequence_length,
                          callback_on_step_end_tensor_inputs=callback_tensor_inputs)
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale)
        num_channels_latents = self.transformer.config.in_channels // 4
        # The sampling state is kept in float32 (the transformer call casts to the model dtype).
        noise, image_ids = self.prepare_latents(batch_size * num_images_per_prompt, num_channels_latents, height, width,
                                                torch.float32, device, generator, latents)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((noise.shape[0],), float(guidance_scale), device=device, dtype=torch.float32)
        inputs = FluxInputs(prompt_embeds, pooled_prompt_embeds, text_ids, image_ids, guidance, joint_attention_kwargs)
        return noise.float(), inputs, int(height), int(width)

    def _transformer_step(self, step_index: int, flow_time: torch.Tensor):
        """Context of one transformer call for diffusers' cache hooks (FirstBlockCache, TaylorSeer, FasterCache,
        PAB, MagCache, SeaCache, ...): they key their state on the transformer's cache context and read
        ``pipe.current_timestep``, which FluxPipeline sets to the scheduler timestep 1000·σ; ours is
        1000·(flow time σ) likewise (for sCM σ = sin t/(sin t + cos t))."""
        sigma = float(flow_time)
        self._current_timestep = flow_time * 1000
        return self.transformer.cache_context("cond", step_index=step_index, num_inference_steps=self._num_timesteps,
                                              timestep=self._current_timestep, sigma=sigma)

    def _step_end(self, callback, tensor_inputs: list[str], step: int, timestep: torch.Tensor,
                  latents: torch.Tensor) -> torch.Tensor:
        """FluxPipeline's ``callback_on_step_end(pipe, step, timestep, {"latents": ...})``; a returned
        ``"latents"`` replaces the sampler state (``pipe.interrupt`` set by a callback stops the loop)."""
        if callback is None:
            return latents
        outputs = callback(self, step, timestep, {"latents": latents} if "latents" in tensor_inputs else {}) or {}
        return outputs.get("latents", latents)

    def _finish(self, latents: torch.Tensor, height: int, width: int, output_type: str, return_dict: bool):
        """Normalised packed latents → images, exactly as FluxPipeline decodes."""
        if output_type == "latent":
            image = latents
        else:
            unpacked = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.vae.decode(unpacked.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self._current_timestep = None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)


class SCMFluxPipeline(_FewStepFluxPipeline):
    """sCM (TrigFlow consistency) sampler for a FLUX student; see the module doc for the update."""

    method = "scm"

    def __init__(self, scheduler: SCMScheduler, vae, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 text_encoder_2: T5EncoderModel, tokenizer_2: T5TokenizerFast,
                 transformer: FluxTransformer2DModel, image_encoder=None, feature_extractor=None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder, feature_extractor)

    @classmethod
    def default_scheduler(cls, base_config: dict | None) -> SCMScheduler:
        return SCMScheduler(prediction_type="trigflow", sigma_data=SCM_SIGMA_DATA)

    def trigflow_output(self, x_scaled: torch.Tensor, t: torch.Tensor, inputs: FluxInputs) -> torch.Tensor:
        """F_θ(x_t/σ_d, t) through the training-time :class:`TrigFlowFlux` view of the flow student."""
        view = getattr(self, "_trigflow_view", None)
        if view is None or view.transformer is not self.transformer:
            # Built once per transformer: TrigFlowFlux registers a forward hook on the model.
            view = TrigFlowFlux(self.transformer, with_logvar=False)
            self._trigflow_view = view
        return view(x_scaled, t, inputs)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 2,
                 timesteps: list[float] | None = None, max_timesteps: float = SCM_MAX_TIMESTEP,
                 intermediate_timesteps: float | None = SCM_INTERMEDIATE_TIMESTEP, guidance_scale: float = 4.5,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 joint_attention_kwargs: dict[str, Any] | None = None, max_sequence_length: int = 256,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None):
        """Sample with the sCM update (module doc).

        Args:
            num_inference_steps: number of consistency jumps (= transformer calls), ≥ 1.
            timesteps: optional explicit TrigFlow grid [t₀ > … > t_N = 0] (overrides the two below).
            max_timesteps: start time t₀ (π/2 = pure noise; 1.5708 as the original).
            intermediate_timesteps: middle time of the 2-step grid (ignored for N ≠ 2, whose grid is
                ``linspace(max_timesteps, 0, N + 1)``).
            guidance_scale: distilled guidance, fed to the guidance embedding.
            generator: one generator, or one per image (then each image's initial and re-injected
                noise depend only on its own generator).
            latents: optional packed unit-variance initial noise [B, N, 4C] (multiplied by σ_d here).
            output_type: "pil", "np", "pt" or "latent" (packed FLUX-normalised latents x̂₀/σ_d).
            joint_attention_kwargs: passed to the attention processors of every call; ``{"scale": s}`` sets the
                LoRA scale of a LoRA student (and of text-encoder LoRAs) for this call.
            callback_on_step_end: ``f(pipe, step, t, {"latents": x_t/σ_d})`` after each step (as FluxPipeline);
                a returned ``"latents"`` replaces the state, ``pipe._interrupt = True`` stops sampling.
        """
        if not isinstance(self.scheduler, SCMScheduler):
            raise TypeError(f"SCMFluxPipeline needs an SCMScheduler, found {type(self.scheduler).__name__}; "
                            "build it with SCMFluxPipeline.from_checkpoint or pass scheduler=SCMScheduler(...)")
        noise, inputs, height, width = self._prepare(
            prompt, prompt_2, height, width, num_inference_steps, num_images_per_prompt, generator, latents,
            prompt_embeds, pooled_prompt_embeds, guidance_scale, max_sequence_length, joint_attention_kwargs,
            callback_on_step_end_tensor_inputs)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        device = noise.device
        scheduler = self.scheduler
        if timesteps is not None:
            grid = _as_time_list(timesteps)
            if len(grid) != num_inference_steps + 1:
                raise ValueError(f"{len(grid)} timesteps given for {num_inference_steps} steps (need steps + 1)")
            scheduler.set_timesteps(num_inference_steps, timesteps=grid, device=device, max_timesteps=None,
                                    intermediate_timesteps=None)
        else:
            middle = intermediate_timesteps if num_inference_steps == 2 else None
            if not 0 < max_timesteps <= SCM_MAX_TIMESTEP or (middle is not None and not 0 < middle < max_timesteps):
                raise ValueError(f"need 0 < intermediate_timesteps < max_timesteps <= {SCM_MAX_TIMESTEP}, got "
                                 f"{middle} and {max_timesteps}")
            scheduler.set_timesteps(num_inference_steps, device=device, max_timesteps=max_timesteps,
                                    intermediate_timesteps=middle)
        scheduler.set_begin_index(0)
        sigma_d = float(scheduler.config.sigma_data)
        batch = noise.shape[0]
        x = noise * sigma_d
        self._num_timesteps = num_inference_steps
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, t in enumerate(scheduler.timesteps[:-1]):
                if self.interrupt:
                    break
                with self._transformer_step(i, trig_to_flow_time(t)):
                    F = self.trigflow_output(x / sigma_d, t.expand(batch), inputs)
                # SCMScheduler: x̂₀ = cos t·x − sin t·(σ_d F); x ← cos t'·x̂₀ + sin t'·σ_d·ε (ε from `generator`).
                x = scheduler.step(sigma_d * F, t, x, generator=generator, return_dict=False)[0]
                if callback_on_step_end is not None:  # the callback sees the unit-variance state x_t/σ_d
                    x = sigma_d * self._step_end(callback_on_step_end, tensor_inputs, i, t, x / sigma_d)
                progress.update()
        return self._finish(x / sigma_d, height, width, output_type, return_dict)


class MeanFlowFluxPipeline(_FewStepFluxPipeline):
    """MeanFlow one-jump sampler for a dual-timestep FLUX student; see the module doc."""

    method = "meanflow"

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, vae, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, text_encoder_2: T5EncoderModel, tokenizer_2: T5TokenizerFast,
                 transformer: FluxTransformer2DModel, image_encoder=None, feature_extractor=None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder, feature_extractor)

    @classmethod
    def default_scheduler(cls, base_config: dict | None) -> FlowMatchEulerDiscreteScheduler:
        # The teacher's scheduler: its shift settings define the default ("flux") time grid.
        return FlowMatchEulerDiscreteScheduler.from_config(base_config or {})

    def time_grid(self, num_steps: int, image_seq_len: int, schedule: str = "flux") -> torch.Tensor:
        """[t₀ = 1, …, t_N = 0] for this pipeline's scheduler settings (:func:`meanflow_time_grid`)."""
        if schedule == "flux" and not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(f"time_schedule='flux' needs FLUX's FlowMatchEulerDiscreteScheduler, found "
                            f"{type(self.scheduler).__name__}; use time_schedule='uniform' or load the teacher's scheduler")
        return meanflow_time_grid(num_steps, image_seq_len, dict(self.scheduler.config), schedule)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 4,
                 timesteps: list[float] | None = None, time_schedule: str = "flux", guidance_scale: float = 3.5,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 joint_attention_kwargs: dict[str, Any] | None = None, max_sequence_length: int = 256,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None):
        """Sample with z_r = z_t − (t − r)·u(z_t, r, t) on the time grid (module doc).

        Args:
            num_inference_steps: number of jumps (= transformer calls), ≥ 1.
            timesteps: optional explicit flow-time grid [1 ≥ t₀ > … > t_N = 0] (overrides ``time_schedule``).
            time_schedule: "flux" (FLUX's resolution-shifted sigmas, the original) or "uniform".
            guidance_scale: distilled guidance, fed to the guidance embedding.
            generator: one generator, or one per image.
            latents: optional packed N(0, I) initial noise [B, N, 4C] (= z at t₀).
            output_type: "pil", "np", "pt" or "latent" (packed FLUX-normalised latents).
            joint_attention_kwargs: as for :class:`SCMFluxPipeline`.
            callback_on_step_end: as for :class:`SCMFluxPipeline`; ``"latents"`` is z at the step's end time.
        """
        if not getattr(self.transformer.config, "interval_embedding", False):
            raise CheckpointError("MeanFlowFluxPipeline needs a dual-timestep student (interval_embedding=True)")
        noise, inputs, height, width = self._prepare(
            prompt, prompt_2, height, width, num_inference_steps, num_images_per_prompt, generator, latents,
            prompt_embeds, pooled_prompt_embeds, guidance_scale, max_sequence_length, joint_attention_kwargs,
            callback_on_step_end_tensor_inputs)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if timesteps is not None:
            grid = torch.tensor(_as_time_list(timesteps), dtype=torch.float32)
            if len(grid) != num_inference_steps + 1 or grid[0] > 1:
                raise ValueError(f"need {num_inference_steps + 1} timesteps in [0, 1], got {grid.tolist()}")
        else:
            grid = self.time_grid(num_inference_steps, noise.shape[1], time_schedule)
        grid = grid.to(noise.device)
        batch = noise.shape[0]
        z = noise
        self._num_timesteps = num_inference_steps
        with self.progress_bar(total=num_inference_steps) as progress:
            for i, (t, r) in enumerate(zip(grid[:-1], grid[1:])):
                if self.interrupt:
                    break
                with self._transformer_step(i, t):
                    u = flow_velocity(self.transformer, z, t.expand(batch), inputs, interval=(t - r).expand(batch))
                z = self._step_end(callback_on_step_end, tensor_inputs, i, t, z - (t - r) * u)
                progress.update()
        return self._finish(z, height, width, output_type, return_dict)


PIPELINES: dict[str, type[_FewStepFluxPipeline]] = {"scm": SCMFluxPipeline, "meanflow": MeanFlowFluxPipeline}

__all__ = ["SCMFluxPipeline", "MeanFlowFluxPipeline", "PIPELINES", "load_student_transformer", "load_teacher_pipeline",
           "meanflow_time_grid", "checkpoint_step", "REMOTE_CODE_MODULES", "SCM_SIGMA_DATA", "SCM_MAX_TIMESTEP", "SCM_INTERMEDIATE_TIMESTEP",
           "MEANFLOW_SCHEDULES", "METHODS"]

