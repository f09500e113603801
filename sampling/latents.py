"""Latent conventions: seeded noise, the VAE-to-model scaling, 2x2 patch packing and position ids."""
from __future__ import annotations

import torch

from ..model_loader import LATENT_CHANNELS, SCALE_FACTOR, SHIFT_FACTOR

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


def pack(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches, row-major, channel-major inside a patch."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """(B, H/2 * W/2, C*4) -> (B, C, H, W); the inverse of `pack`."""
    b, _, d = tokens.shape
    c, h2, w2 = d // 4, latent_height // 2, latent_width // 2
    x = tokens.reshape(b, h2, w2, c, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, latent_height, latent_width)


def image_ids(batch: int, latent_height: int, latent_width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 3) position ids (0, row, col) of the packed image tokens, float32."""
    h2, w2 = latent_height // 2, latent_width // 2
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(1, h2 * w2, 3).expand(batch, -1, -1).contiguous()


def text_ids(batch: int, num_tokens: int) -> torch.Tensor:
    """(B, T, 3) zeros: text tokens carry no position in FLUX's rotary embedding."""
    return torch.zeros(batch, num_tokens, 3)
