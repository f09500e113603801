"""Inpainting: a mask (1 = repaint) and the image latent -> the image's known region kept through the Euler loop.

In: a mask at the image's resolution, (H, W), (B, H, W) or (B, 1, H, W) float in 0..1 (ComfyUI's MASK, or the
`noise_mask` SetLatentNoiseMask puts in a LATENT), the image latent in model space and the run's noise.
Out: `KnownRegion`, whose `keep(x, t_next)` the Euler loop applies after every step.

The rule is diffusers' FluxInpaintPipeline's, for a 64-channel (text-to-image) FLUX transformer:
- the mask is resized to the image size by nearest neighbour, binarized (< 0.5 -> 0: keep, >= 0.5 -> 1: repaint)
  and resized to the latent grid by nearest neighbour (the top-left pixel of each 8x8 block), the same for all
  16 latent channels;
- the run starts as image-to-image (the whole latent is the image noised to the first time of the schedule that
  `strength` leaves);
- after each Euler step to t_next, the known region is the image noised to t_next with the run's own noise:
  x = mask * x + (1 - mask) * (t_next * noise + (1 - t_next) * image); after the last step t_next is 0, so the
  known region is the image latent exactly.
A soft (feathered) mask therefore acts as its 0.5 threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .latents import LATENT_CHANNELS, pack
from .parameters import nearest_multiple

# ComfyUI's LoadImage gives an all-zero mask of this side for an image without transparency.
NO_ALPHA_MASK_SIDE = 64
BINARIZE_AT = 0.5


def mask_size_problem(mask_height: int, mask_width: int, image_height: int, image_width: int) -> str | None:
    """Why a mask of this size cannot mark regions of an image sampled at image_width x image_height (None: it
    can). Accepted: the image's size, or any size that rounds to it as Krea Encode Image rounds an input image
    (so the mask of the input image itself fits, whatever its size)."""
    if (nearest_multiple(mask_height), nearest_multiple(mask_width)) == (image_height, image_width):
        return None
    problem = (f"the mask is {mask_width}x{mask_height} but the image is sampled at {image_width}x{image_height} "
               "(its sides rounded to multiples of 16)")
    if (mask_height, mask_width) == (NO_ALPHA_MASK_SIDE, NO_ALPHA_MASK_SIDE):
        return (f"{problem} ({NO_ALPHA_MASK_SIDE}x{NO_ALPHA_MASK_SIDE} is the empty mask Load Image gives for an "
                "image without transparency): paint the region to repaint in Load Image's mask editor, or load a "
                "black-and-white mask of the image's size with Load Image (as Mask)")
    return (f"{problem}; give a mask of the input image's size (white = repaint), e.g. Load Image (as Mask) "
            "of a mask drawn on that image")


def as_mask_batch(mask: object, name: str = "mask") -> torch.Tensor:
    """A MASK or noise_mask as float32 (B, H, W), or a ValueError that says what is wrong."""
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
        raise ValueError(f"{name} must be a MASK (a float tensor of shape (batch, height, width) in 0..1), got "
                         f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}.")
    if mask.ndim == 4 and mask.shape[1] == 1:  # a LATENT's noise_mask: (B, 1, H, W)
        mask = mask[:, 0]
    elif mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or min(mask.shape) == 0:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; a MASK is (batch, height, width) or (height, "
                         "width).")
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name} holds NaN or infinite values; a mask holds values in 0..1 (1 = repaint).")
    return mask.float()


def mask_problem(mask: torch.Tensor, latent_height: int, latent_width: int, num_images: int) -> str | None:
    """Why a (B, H, W) mask cannot serve a run of num_images on a latent_height x latent_width latent."""
    if mask.shape[0] not in (1, num_images):
        return f"the mask holds {mask.shape[0]} masks but num_images is {num_images}; give one mask, or one per image"
    return mask_size_problem(mask.shape[1], mask.shape[2], latent_height * 8, latent_width * 8)


def latent_mask(mask: torch.Tensor, latent_height: int, latent_width: int, num_images: int) -> torch.Tensor:
    """(num_images, 1, latent_height, latent_width) float32 of 0 (keep) and 1 (repaint) from a (B, H, W) mask."""
    problem = mask_problem(mask, latent_height, latent_width, num_images)
    if problem:
        raise ValueError(problem + ".")
    mask = mask[:, None].float().cpu()
    size = (latent_height * 8, latent_width * 8)
    if tuple(mask.shape[-2:]) != size:
        mask = F.interpolate(mask, size=size, mode="nearest")
    mask = (mask >= BINARIZE_AT).float()
    mask = F.interpolate(mask, size=(latent_height, latent_width), mode="nearest")
    return mask.expand(num_images, -1, -1, -1)


@dataclass(frozen=True)
class KnownRegion:
    """What the loop needs to keep the unmasked region: all packed (B, L, 64) float32 on one device."""
    repaint: torch.Tensor  # 1 where the model samples, 0 where the image is kept
    image: torch.Tensor  # the image latent, model space
    noise: torch.Tensor  # the run's initial noise

    @classmethod
    def build(cls, mask: torch.Tensor, image: torch.Tensor, noise: torch.Tensor) -> KnownRegion:
        """mask (B, H, W) at image resolution; image and noise (B, 16, H/8, W/8), model space."""
        batch, _, lh, lw = noise.shape
        grid = latent_mask(mask, lh, lw, batch).expand(-1, LATENT_CHANNELS, -1, -1)
        return cls(pack(grid), pack(image), pack(noise))

    def to(self, device: torch.device) -> KnownRegion:
        return KnownRegion(self.repaint.to(device), self.image.to(device), self.noise.to(device))

    def keep(self, x: torch.Tensor, t_next: float) -> torch.Tensor:
        """x (B, L, 64) at time t_next with the known region set to the image noised to t_next."""
        known = self.image if t_next == 0.0 else t_next * self.noise + (1.0 - t_next) * self.image
        return self.repaint * x + (1.0 - self.repaint) * known
