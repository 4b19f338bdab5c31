"""FLUX text/VAE conditioning reused from diffusers' own ``FluxPipeline`` (no re-implementation).

``FluxConditioner`` wraps a ``FluxPipeline`` loaded *without* a transformer and exposes what training
needs: prompt encoding (CLIP pooled + T5 at ``max_sequence_length``), VAE encoding to packed,
shifted and scaled latents, and the RoPE position ids.  Precomputed features plug in here later.
"""
from __future__ import annotations

import torch
from diffusers import FluxPipeline

from .trigflow import FluxInputs


def check_resolution(resolution: int, vae_scale_factor: int) -> None:
    """FLUX packs 2×2 latent patches, so pixels must be a multiple of 2·vae_scale_factor (16 for FLUX)."""
    multiple = 2 * vae_scale_factor
    if resolution <= 0 or resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a positive multiple of {multiple}: the VAE downsamples by "
                         f"{vae_scale_factor} and FLUX packs 2x2 latent patches. Use e.g. {max(multiple, resolution // multiple * multiple)}.")


def load_flux_components(pretrained: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                         vae_dtype: torch.dtype | None = None) -> FluxPipeline:
    """VAE, CLIP + T5 encoders/tokenizers and scheduler of a FLUX pipeline, without its transformer.

    ``vae_dtype`` (default: ``dtype``) loads the VAE in its own precision (casting it afterwards with
    ``.to()`` makes diffusers warn about its fp32 modules on every rank)."""
    dtypes = dtype if vae_dtype is None else {"default": dtype, "vae": vae_dtype}
    return FluxPipeline.from_pretrained(pretrained, transformer=None, revision=revision, dtype=dtypes)


class FluxConditioner:
    """Frozen text encoders + VAE: captions and pixels → (packed latents, :class:`FluxInputs`)."""

    def __init__(self, pipe: FluxPipeline, device: torch.device | str, max_sequence_length: int = 256):
        self.pipe = pipe
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False).eval().to(self.device)

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prompt_embeds, pooled, text_ids = self.pipe.encode_prompt(
            captions, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return prompt_embeds.float(), pooled.float(), text_ids

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] [B,3,H,W] → packed latents (VAE mean − shift)·scale, [B, HW/(4f²), 4C]."""
        vae = self.pipe.vae
        pixels = pixel_values.to(self.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mean
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents.float(), b, c, h, w)

    def image_ids(self, height: int, width: int) -> torch.Tensor:
        """RoPE ids of the packed latent grid of an image of ``height``×``width`` pixels."""
        f = self.vae_scale_factor
        return self.pipe._prepare_latent_image_ids(1, height // f // 2, width // f // 2, self.device, torch.float32)

    def __call__(self, pixel_values: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, FluxInputs]:
        latents = self.encode_images(pixel_values)
        prompt_embeds, pooled, text_ids = self.encode_prompts(captions)
        height, width = pixel_values.shape[-2:]
        return latents, FluxInputs(prompt_embeds, pooled, text_ids, self.image_ids(height, width))
