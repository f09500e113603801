"""An image file -> IMAGE (1, H, W, 3) and MASK (1, H, W), as ComfyUI's LoadImage node reads it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..sampling.parameters import MAX_SIDE


def load_image_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The image turned upright by its EXIF orientation, as float32 RGB in 0..1, and its mask: 1 where the
    image is transparent (ComfyUI's convention: the mask marks what to repaint), 0 for opaque images."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(rgba[..., :3].copy())[None]
    mask = 1.0 - torch.from_numpy(rgba[..., 3].copy())[None]
    return pixels, mask


def image_file_problem(path: Path) -> str | None:
    """What keeps `path` from being read as an input image (None: nothing): missing, not a file, not an image,
    damaged or truncated, or sides over MAX_SIDE. Reads the header first and decodes only images within limits."""
    if not path.exists():
        return f"input image {path} not found"
    if not path.is_file():
        return f"input image {path} is not a file"
    try:
        with Image.open(path) as img:
            width, height = img.size
            if max(width, height) > MAX_SIDE:
                return (f"input image {path} is {width}x{height}; the longest side may be at most {MAX_SIDE} "
                        "pixels: scale it down first")
            img.load()  # decodes everything: a truncated or damaged file is found here, not after the models load
    except UnidentifiedImageError:
        return f"{path} is not an image file PIL can read (png, jpeg, webp, ...)"
    except Image.DecompressionBombError as err:
        return f"input image {path} is too large to read safely ({err})"
    except (OSError, ValueError, SyntaxError) as err:
        return f"input image {path} is damaged or truncated ({err}); save it again or use another file"
    return None
