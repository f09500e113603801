"""An image file -> IMAGE (1, H, W, 3) and MASK (1, H, W), as ComfyUI's LoadImage node reads it.

An image is decoded once: `decoded_image` reads the header, refuses what is too large before decoding, then
decodes everything (a damaged or truncated file is found there), and `image_and_mask` turns the decoded image into
tensors without decoding it again.
"""
from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..sampling.parameters import MAX_SIDE


class ImageFileError(ValueError):
    """An input image that cannot be used; the message names it and says why."""


def decoded_image(source: Path | BinaryIO, name: str, max_pixels: int | None = None) -> Image.Image:
    """The image of `source` decoded in full, or ImageFileError naming it as `name`: not an image, damaged or
    truncated, a side over MAX_SIDE, or more than `max_pixels` pixels (both told from the header, before
    decoding)."""
    try:
        img = Image.open(source)
    except UnidentifiedImageError:
        raise ImageFileError(f"{name} is not an image file PIL can read (png, jpeg, webp, ...)") from None
    except Image.DecompressionBombError as err:  # PIL's own guard, at twice its pixel limit
        raise ImageFileError(f"{name} is too large to read safely ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageFileError(f"{name} is damaged or truncated ({err}); save it again or use another file") from None
    try:
        width, height = img.size
        if max(width, height) > MAX_SIDE:
            raise ImageFileError(f"{name} is {width}x{height}; the longest side may be at most {MAX_SIDE} pixels: "
                                 "scale it down first")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageFileError(f"{name} is {width}x{height}; at most {max_pixels} pixels are taken")
        img.load()  # decodes everything: a truncated or damaged file is found here, not after the models load
    except ImageFileError:
        img.close()
        raise
    except Image.DecompressionBombError as err:
        img.close()
        raise ImageFileError(f"{name} is too large to read safely ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        img.close()
        raise ImageFileError(f"{name} is damaged or truncated ({err}); save it again or use another file") from None
    return img


def image_and_mask(img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded image turned upright by its EXIF orientation, as float32 RGB in 0..1, and its mask: 1 where the
    image is transparent (ComfyUI's convention: the mask marks what to repaint), 0 for opaque images."""
    upright = ImageOps.exif_transpose(img)
    rgba = np.asarray(upright.convert("RGBA"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(rgba[..., :3].copy())[None]
    mask = 1.0 - torch.from_numpy(rgba[..., 3].copy())[None]
    return pixels, mask


def load_image_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE and MASK of an image file (ImageFileError when it cannot be used, see image_file_problem)."""
    if not path.is_file():
        raise ImageFileError(_missing(path))
    with decoded_image(path, f"input image {path}") as img:
        return image_and_mask(img)


def image_file_problem(path: Path) -> str | None:
    """What keeps `path` from being read as an input image (None: nothing): missing, not a file, not an image,
    damaged or truncated, or sides over MAX_SIDE. Reads the header first and decodes only images within limits."""
    if not path.is_file():
        return _missing(path)
    try:
        decoded_image(path, f"input image {path}").close()
    except ImageFileError as err:
        return str(err)
    return None


def _missing(path: Path) -> str:
    return f"input image {path} not found" if not path.exists() else f"input image {path} is not a file"
