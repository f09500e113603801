"""Latent conventions: seeded noise, the VAE-to-model scaling, 2x2 patch packing and position ids."""
from __future__ import annotations

import torch

from ..model_loader import LATENT_CHANNELS, SCALE_FACTOR, SHIFT_FACTOR
from ..model_loader.flux.math import image_ids, pack, text_ids, unpack

__all__ = ["LATENT_CHANNELS", "SCALE_FACTOR", "SHIFT_FACTOR", "image_ids", "make_noise", "pack", "text_ids",
           "to_model_space", "to_raw", "unpack"]


def make_noise(seed: int, num_images: int, latent_height: int, latent_width: int) -> torch.Tensor:
    """(num_images, 16, H/8, W/8) float32 on the CPU, exactly as ComfyUI's KSampler draws it for `seed`.

    Drawn on the CPU so the same seed gives the same image on any GPU; image 0 of a batch is the single
    image of the same seed, because the generator fills the batch in order.
    """
    generator = torch.manual_seed(seed)
    return torch.randn((num_images, LATENT_CHANNELS, latent_height, latent_width),
                       generator=generator, dtype=torch.float32, device="cpu")


def to_model_space(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (what LATENT holds) -> what the transformer sees."""
    return (raw - SHIFT_FACTOR) * SCALE_FACTOR


def to_raw(model_latent: torch.Tensor) -> torch.Tensor:
    return model_latent / SCALE_FACTOR + SHIFT_FACTOR
