"""The FLUX MMDiT used as teacher and student, hooked (not copied) from diffusers.

Stock ``FluxTransformer2DModel.forward`` casts ``timestep`` and ``guidance`` to the hidden-state
dtype and multiplies them by 1000 before the sinusoidal projection.  Two things are wrong with that
for JVP-based distillation:

* the factor 1000 multiplies every time tangent: d/dt sin(1000·t·ω) = 1000·ω·cos(...), which is what
  makes sCM/MeanFlow diverge on FLUX (the paper's first guideline: rescale time to [0, 1]);
* in bf16 the time loses 8 bits of precision before it is embedded.

:class:`DistillFluxTransformer2DModel` keeps the stock parameters and forward, and replaces only the
``time_text_embed`` module by :class:`ExactTimeTextEmbedding`, which embeds the *caller's* float32
timestep/guidance multiplied by ``config.timestep_scale`` (1000 = stock, 1 = "rescaled").  It can also
carry a second timestep embedder for the MeanFlow interval h = t − r, whose output is added to the
usual conditioning vector (dual-timestep student).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
# ModelMixin is imported for diffusers' pipeline loader, not used here: a saved pipeline's model_index.json
# names this module as the transformer's library, and the loader looks up the loadable base classes
# (ModelMixin → from_pretrained) as attributes of that module.
from diffusers import FluxTransformer2DModel, ModelMixin  # noqa: F401
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

STOCK_TIMESTEP_SCALE = 1000.0


@dataclass
class TimeInputs:
    """The exact (un-cast) time inputs of one forward call."""

    timestep: torch.Tensor
    guidance: torch.Tensor | None
    interval: torch.Tensor | None


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype ``layer`` computes in: its weight's, or under diffusers' layerwise casting (e.g. float8
    storage) the compute dtype its hook casts the weight to for the forward."""
    hooks = getattr(layer, "_diffusers_hook", None)
    casting = hooks.get_hook("layerwise_casting") if hooks is not None else None
    return casting.compute_dtype if casting is not None else layer.weight.dtype


class ExactTimeTextEmbedding(nn.Module):
    """FLUX's time + guidance + pooled-text conditioning, embedding exact float32 inputs.

    conditioning = MLP_t(sin/cos(scale·t)) [+ MLP_g(sin/cos(scale·g))] [+ MLP_h(sin/cos(scale·h))]
                   + MLP_text(pooled)

    The submodules are the stock ones (same parameter names, so stock checkpoints load unchanged);
    ``interval_embedder`` is the extra MeanFlow branch.  The parent transformer stores the exact
    inputs in :attr:`exact_inputs` for the duration of its forward; the stock forward's pre-scaled,
    dtype-cast arguments are ignored.
    """

    def __init__(self, stock: nn.Module, timestep_scale: float, interval_embedder: nn.Module | None = None):
        super().__init__()
        self.time_proj = stock.time_proj
        self.timestep_embedder = stock.timestep_embedder
        if hasattr(stock, "guidance_embedder"):
            self.guidance_embedder = stock.guidance_embedder
        self.text_embedder = stock.text_embedder
        self.interval_embedder = interval_embedder
        # False while a LoRA student's shared weights compute its teacher (model/lora.py teacher_mode).
        self.interval_enabled = True
        self.timestep_scale = float(timestep_scale)
        self.exact_inputs: TimeInputs | None = None

    @property
    def has_guidance(self) -> bool:
        return hasattr(self, "guidance_embedder")

    def sinusoid(self, value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """diffusers' ``Timesteps`` projection of ``scale·value``, computed in float32 *or wider*.

        ``scale`` defaults to :attr:`timestep_scale`.

        emb_k = sin/cos(scale·value·exp(−ln(10000)·k/(half − shift))), k < half; cos first (flip_sin_to_cos).
        Stock ``get_timestep_embedding`` always works in float32; computing in float64 for float64 inputs
        lets finite-difference checks of the time tangent reach float64 accuracy.
        """
        proj = self.time_proj
        dtype = torch.promote_types(value.dtype, torch.float32)
        half = proj.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=dtype, device=value.device) / (half - proj.downscale_freq_shift)
        scale = self.timestep_scale if scale is None else float(scale)
        arg = (value.to(dtype) * scale)[:, None] * torch.exp(exponent)[None, :] * proj.scale
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        if proj.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return emb

    def _embed(self, embedder: nn.Module, value: torch.Tensor, dtype: torch.dtype, scale: float | None) -> torch.Tensor:
        # In the embedder's own dtype: a LoRA student trains its interval embedder in float32 beside a bf16 base.
        own = _compute_dtype(embedder.linear_1)
        return embedder(self.sinusoid(value, scale).to(own)).to(dtype)

    def conditioning(self, inputs: TimeInputs, pooled_projection: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
        """The conditioning vector of exact time inputs; ``scale`` overrides :attr:`timestep_scale`."""
        dtype = pooled_projection.dtype
        emb = self._embed(self.timestep_embedder, inputs.timestep, dtype, scale)
        if self.has_guidance:
            if inputs.guidance is None:
                raise ValueError("this FLUX transformer has a guidance embedding: pass `guidance=`")
            emb = emb + self._embed(self.guidance_embedder, inputs.guidance, dtype, scale)
        if self.interval_embedder is not None and self.interval_enabled:
            if inputs.interval is None:
                raise ValueError("this transformer has an interval (t - r) embedding: pass `interval=`")
            emb = emb + self._embed(self.interval_embedder, inputs.interval, dtype, scale)
        return emb + self.text_embedder(pooled_projection)

    def forward(self, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if self.exact_inputs is None:
            # Called directly with stock (×1000, already multiplied) arguments.
            inputs = TimeInputs(timestep / STOCK_TIMESTEP_SCALE,
                                rest[0] / STOCK_TIMESTEP_SCALE if len(rest) == 2 else None, None)
        else:
            inputs = self.exact_inputs
        return self.conditioning(inputs, rest[-1])


class DistillFluxTransformer2DModel(FluxTransformer2DModel):
    """FLUX MMDiT with a configurable time-input scale and an optional interval embedding.

    Extra config fields (saved in ``config.json``):
        timestep_scale: factor applied to ``timestep``, ``guidance`` and ``interval`` before the
            sinusoidal projection. 1000 reproduces stock FLUX; 1 is the paper's rescaled model.
        interval_embedding: whether a second ``TimestepEmbedding`` for h = t − r exists (MeanFlow).

    Load a stock FLUX transformer as ×1 model with
    ``DistillFluxTransformer2DModel.from_pretrained(path, subfolder="transformer", timestep_scale=1.0)``
    (the weights are the stock ones; the rescaled *weights* come from ``--rescaled_checkpoint_path``).
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        timestep_scale: float = STOCK_TIMESTEP_SCALE,
        interval_embedding: bool = False,
    ):
        super().__init__(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels,
            num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds, axes_dims_rope=axes_dims_rope,
        )
        interval = TimestepEmbedding(in_channels=256, time_embed_dim=self.inner_dim) if interval_embedding else None
        self.time_text_embed = ExactTimeTextEmbedding(self.time_text_embed, timestep_scale, interval)

    @property
    def timestep_scale(self) -> float:
        return float(self.config.timestep_scale)

    def set_timestep_scale(self, scale: float) -> None:
        """Change the factor applied to timestep, guidance and interval (config and embedding together).

        Used to start teacher rescaling: the stock weights with ``scale=1`` are the ×1 student at step 0.
        """
        if not scale > 0:
            raise ValueError(f"timestep_scale must be > 0, got {scale!r}")
        self.register_to_config(timestep_scale=float(scale))
        self.time_text_embed.timestep_scale = float(scale)

    def enable_interval_embedding(self, init: str = "copy") -> None:
        """Add the MeanFlow interval embedder MLP_h (no-op if present).

        init="copy": MLP_h := MLP_t, as the original release (the student then differs from the
            teacher at step 0 by MLP_t(h) + ... unless h = 0 embeds to zero, which it does not).
        init="zero": MLP_h := MLP_t with its last linear layer zeroed, so MLP_h(·) ≡ 0 and the student
            starts exactly equal to the teacher.
        """
        if init not in ("copy", "zero"):
            raise ValueError(f"init must be 'copy' or 'zero', got {init!r}")
        embed = self.time_text_embed
        if embed.interval_embedder is None:
            ref = embed.timestep_embedder
            new = TimestepEmbedding(in_channels=256, time_embed_dim=self.inner_dim)
            new.load_state_dict(ref.state_dict())
            new.to(device=ref.linear_1.weight.device, dtype=ref.linear_1.weight.dtype)
            if init == "zero":
                nn.init.zeros_(new.linear_2.weight)
                nn.init.zeros_(new.linear_2.bias)
            embed.interval_embedder = new
        self.register_to_config(interval_embedding=True)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                pooled_projections: torch.Tensor | None = None, timestep: torch.Tensor | None = None,
                img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, joint_attention_kwargs: dict[str, Any] | None = None,
                controlnet_block_samples=None, controlnet_single_block_samples=None, return_dict: bool = True,
                controlnet_blocks_repeat: bool = False, interval: torch.Tensor | None = None):
        """Stock FLUX forward (same positional order and options); ``timestep``/``guidance``/``interval``
        are embedded exactly in float32 at ``config.timestep_scale`` (see module doc).

        ``interval`` (h = t − r, MeanFlow students only) comes last so that every stock call works unchanged.
        """
        if timestep is None:
            raise ValueError("`timestep` is required (the flow time in [0, 1], one per sample or one for the batch)")
        batch = hidden_states.shape[0]
        self.time_text_embed.exact_inputs = TimeInputs(_per_sample(timestep, batch), _per_sample(guidance, batch),
                                                       _per_sample(interval, batch))
        try:
            return super().forward(
                hidden_states, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                joint_attention_kwargs=joint_attention_kwargs, controlnet_block_samples=controlnet_block_samples,
                controlnet_single_block_samples=controlnet_single_block_samples, return_dict=return_dict,
                controlnet_blocks_repeat=controlnet_blocks_repeat)
        finally:
            self.time_text_embed.exact_inputs = None


def _per_sample(value: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A time input as shape [batch]: one value broadcast to the batch, or one per sample."""
    if value is None:
        return None
    return value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)
