"""Tiny FLUX transformers and inputs for unit tests (no pipeline folder needed)."""
from __future__ import annotations

import torch

from model.transformer import DistillFluxTransformer2DModel
from model.trigflow import FluxInputs

TINY = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def tiny_transformer(seed: int = 0, dtype=torch.float32, **overrides) -> DistillFluxTransformer2DModel:
    torch.manual_seed(seed)
    model = DistillFluxTransformer2DModel(**{**TINY, **overrides}).to(dtype).eval()
    # Random (not zero-initialised) output layers so outputs depend on every input.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def tiny_inputs(batch: int = 2, side: int = 4, n_text: int = 5, seed: int = 1, dtype=torch.float32,
                guidance: float | None = 3.5) -> tuple[torch.Tensor, FluxInputs]:
    """Packed latents [B, side², 16] and matching FLUX inputs."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, side * side, TINY["in_channels"], generator=g, dtype=dtype)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = FluxInputs(
        encoder_hidden_states=torch.randn(batch, n_text, TINY["joint_attention_dim"], generator=g, dtype=dtype),
        pooled_projections=torch.randn(batch, TINY["pooled_projection_dim"], generator=g, dtype=dtype),
        txt_ids=torch.zeros(n_text, 3), img_ids=ids.reshape(-1, 3),
        guidance=None if guidance is None else torch.full((batch,), guidance, dtype=dtype))
    return latents, inputs


def stock_time_text_embed(transformer: DistillFluxTransformer2DModel) -> torch.nn.Module:
    """diffusers' own ``CombinedTimestepGuidanceTextProjEmbeddings`` holding the *same* parameter tensors.

    An independent reference for the conditioning vector: stock code, stock sinusoid (float32), and
    gradients land on the transformer's parameters because the tensors are shared, not copied.
    Call it as stock FLUX does: ``ref(scale·t, scale·g, pooled)``.
    """
    from diffusers.models.embeddings import CombinedTimestepGuidanceTextProjEmbeddings

    ours = transformer.time_text_embed
    ref = CombinedTimestepGuidanceTextProjEmbeddings(transformer.inner_dim, transformer.config.pooled_projection_dim)
    for name in ("timestep_embedder", "guidance_embedder", "text_embedder"):
        setattr(ref, name, getattr(ours, name))
    return ref
