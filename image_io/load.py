"""An image file -> IMAGE (1, H, W, 3) and MASK (1, H, W), as ComfyUI's LoadImage node reads it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def load_image_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The image turned upright by its EXIF orientation, as float32 RGB in 0..1, and its mask: 1 where the
    image is transparent (ComfyUI's convention: the mask marks what to repaint), 0 for opaque images."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(rgba[..., :3].copy())[None]
    mask = 1.0 - torch.from_numpy(rgba[..., 3].copy())[None]
    return pixels, mask
