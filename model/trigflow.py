"""TrigFlow view of a flow-matching FLUX (sCM's parameterisation), with the adaptive-weight head.

Flow matching: z_s = (1 − s)·x₀ + s·ε, velocity v = ε − x₀, s ∈ [0, 1].
TrigFlow (σ_d-normalised): x_t/σ_d = cos t·x₀/σ_d + sin t·ε, target F = cos t·ε − sin t·x₀/σ_d.

Matching signal-to-noise ratios gives, with n(s) = √(s² + (1 − s)²):
    s = sin t / (cos t + sin t)                       (flow time)
    z = (x_t/σ_d)·n(s)                                (flow state)
    F = [(1 − 2s)·z + (1 − 2s + 2s²)·v(z, s)] / n(s)  (TrigFlow output from the flow velocity)
so a pretrained flow model is a TrigFlow model without retraining.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import ModelMixin
from torch import nn

from .transformer import TimeInputs


@dataclass
class FluxInputs:
    """Everything FLUX needs besides the noisy latent and the time (packed layout)."""

    encoder_hidden_states: torch.Tensor  # [B, L, joint_attention_dim] T5 tokens
    pooled_projections: torch.Tensor  # [B, pooled_projection_dim] CLIP pooled
    txt_ids: torch.Tensor  # [L, 3]
    img_ids: torch.Tensor  # [N, 3]
    guidance: torch.Tensor | None = None  # [B] guidance-embedding scale (guidance-distilled FLUX)
    joint_attention_kwargs: dict | None = None  # passed to the attention processors, e.g. {"scale": LoRA scale}

    def kwargs(self, dtype: torch.dtype) -> dict:
        return dict(encoder_hidden_states=self.encoder_hidden_states.to(dtype),
                    pooled_projections=self.pooled_projections.to(dtype),
                    txt_ids=self.txt_ids, img_ids=self.img_ids, guidance=self.guidance, return_dict=False,
                    joint_attention_kwargs=self.joint_attention_kwargs)

    def select(self, index: torch.Tensor) -> "FluxInputs":
        return FluxInputs(self.encoder_hidden_states[index], self.pooled_projections[index], self.txt_ids,
                          self.img_ids, None if self.guidance is None else self.guidance[index],
                          self.joint_attention_kwargs)


def trig_to_flow_time(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def compute_dtype(transformer: nn.Module) -> torch.dtype:
    """The dtype the transformer computes in: its parameters' dtype, or — under diffusers' layerwise
    casting (e.g. float8 storage, bf16 compute) — the compute dtype, which ``ModelMixin.dtype`` reports."""
    if isinstance(transformer, ModelMixin):
        return transformer.dtype
    first = next(transformer.parameters(), None)
    return first.dtype if first is not None else transformer.dtype  # a LoRA TiedTeacher owns no parameters


def flow_velocity(transformer: nn.Module, z: torch.Tensor, s: torch.Tensor, inputs: FluxInputs,
                  interval: torch.Tensor | None = None) -> torch.Tensor:
    """v(z, s) of a FLUX flow model, computed in the model's compute dtype and returned as float32."""
    dtype = compute_dtype(transformer)
    extra = {} if interval is None else {"interval": interval}
    out = transformer(z.to(dtype), timestep=s, **inputs.kwargs(dtype), **extra)[0]
    return out.float()


# Where sCM's logvar head reads its input (``--logvar_input``); the first is the original release's.
LOGVAR_INPUTS = ("trig_time", "flow_time")


class TrigFlowFlux(nn.Module):
    """F_θ(x_t/σ_d, t) from a FLUX velocity model; optionally with the learned ``logvar`` head.

    ``logvar = logvar_linear(c)``, one scalar per sample (sCM's adaptive loss weight), where the
    conditioning vector c is, by ``logvar_input``:

    * ``"trig_time"`` (the original release): c = time_text_embed(t, g, pooled) recomputed at the
      *TrigFlow* angle t with the ×1 sinusoid, c = MLP_t(sin/cos(1·t)) + MLP_g(sin/cos(1·g)) + MLP_text(pooled),
      whatever the model's ``timestep_scale`` (the release calls ``time_text_embed`` directly, and its
      ×1000/×1 factor lives in the transformer's forward). Gradients of the logvar term reach
      ``time_text_embed``'s MLPs, as in the release.
    * ``"flow_time"``: c is the vector FLUX computes for its own forward, at the *flow* time
      s = sin t/(cos t + sin t) with the model's ``timestep_scale`` (captured by a forward hook): the
      conditioning that actually modulates the blocks, inside the [0, 1] range the (rescaled) time
      embedder was trained on (t reaches π/2 > 1), and no extra embedding pass.
    """

    def __init__(self, transformer: nn.Module, with_logvar: bool = False, logvar_input: str = "trig_time"):
        super().__init__()
        if logvar_input not in LOGVAR_INPUTS:
            raise ValueError(f"--logvar_input {logvar_input!r} is not one of {', '.join(LOGVAR_INPUTS)}")
        self.transformer = transformer
        self.logvar_input = logvar_input
        self.logvar_linear = None
        if with_logvar:
            self.logvar_linear = nn.Linear(transformer.inner_dim, 1)
            nn.init.xavier_uniform_(self.logvar_linear.weight)
            nn.init.zeros_(self.logvar_linear.bias)
        self._captured_temb: torch.Tensor | None = None
        if with_logvar and logvar_input == "flow_time":
            transformer.time_text_embed.register_forward_hook(self._capture_temb)

    def _capture_temb(self, module, args, output):
        self._captured_temb = output

    def logvar_conditioning(self, t: torch.Tensor, inputs: FluxInputs) -> torch.Tensor:
        """c for the head at the TrigFlow angle t [B] (``trig_time``): time_text_embed(t, g, pooled), ×1 sinusoid."""
        dtype = next(self.transformer.parameters()).dtype
        guidance = None if inputs.guidance is None else inputs.guidance.reshape(-1).expand(t.shape[0])
        return self.transformer.time_text_embed.conditioning(
            TimeInputs(t, guidance, None), inputs.pooled_projections.to(dtype), scale=1.0)

    def forward(self, x_scaled: torch.Tensor, t: torch.Tensor, inputs: FluxInputs, return_logvar: bool = False):
        """x_scaled = x_t/σ_d (packed latents), t ∈ (0, π/2] of shape [B]. Returns F (float32)[, logvar [B]]."""
        t = t.reshape(-1).float()
        s = trig_to_flow_time(t)
        norm = _bcast(torch.sqrt(s ** 2 + (1 - s) ** 2), x_scaled)
        sb = _bcast(s, x_scaled)
        z = x_scaled.float() * norm
        v = flow_velocity(self.transformer, z, s, inputs)
        F = ((1 - 2 * sb) * z + (1 - 2 * sb + 2 * sb ** 2) * v) / norm
        temb, self._captured_temb = self._captured_temb, None
        if not return_logvar:
            return F
        if self.logvar_linear is None:
            raise ValueError("this TrigFlow model has no logvar head (with_logvar=False)")
        if self.logvar_input == "trig_time":
            temb = self.logvar_conditioning(t, inputs)
        logvar = self.logvar_linear(temb.to(self.logvar_linear.weight.dtype)).float().reshape(-1)
        return F, logvar
