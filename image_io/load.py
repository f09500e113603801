"""An image file -> IMAGE (1, H, W, 3) and MASK (1, H, W), as ComfyUI's LoadImage node reads it, or one channel of
it -> MASK (1, H, W), as ComfyUI's LoadImageMask reads it.

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

from ..sampling.inpaint import NO_ALPHA_MASK_SIDE
from ..sampling.parameters import MAX_SIDE

EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5 to 8 turn the image a quarter (sides swap)
QUARTER_TURNS = (5, 6, 7, 8)
# LoadImageMask's channel choices, in ComfyUI's order.
MASK_CHANNELS = ("alpha", "red", "green", "blue")


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


def _upright(img: Image.Image) -> Image.Image:
    """`img` turned upright by its EXIF orientation; a 32-bit integer image (mode I: a TIFF, for example)
    divided by 255 first, as ComfyUI's LoadImage and LoadImageMask do. PIL opens a 16-bit PNG as I;16, which
    ComfyUI does not scale: its values clip at 255 there and here alike."""
    upright = ImageOps.exif_transpose(img)
    if upright.mode == "I":
        upright = upright.point(lambda value: value * (1 / 255))
    return upright


def image_and_mask(img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoded image turned upright (see _upright), as float32 RGB in 0..1, and its mask: 1 where the
    image is transparent (ComfyUI's convention: the mask marks what to repaint); an image without transparency
    gets ComfyUI's all-zero 64x64 mask."""
    upright = _upright(img)
    has_alpha = "A" in upright.getbands() or (upright.mode == "P" and "transparency" in upright.info)
    rgba = np.asarray(upright.convert("RGBA"), dtype=np.float32) / 255.0
    pixels = torch.from_numpy(rgba[..., :3].copy())[None]
    if not has_alpha:
        return pixels, torch.zeros(1, NO_ALPHA_MASK_SIDE, NO_ALPHA_MASK_SIDE)
    return pixels, 1.0 - torch.from_numpy(rgba[..., 3].copy())[None]


def channel_mask(img: Image.Image, channel: str) -> torch.Tensor:
    """One channel of a decoded image (turned upright) as a (1, H, W) float32 mask in 0..1: red, green or blue as
    they are (white = 1 = repaint), alpha inverted (transparent = 1), as ComfyUI's LoadImageMask reads it."""
    if channel not in MASK_CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(MASK_CHANNELS)}, got {channel!r}")
    upright = _upright(img)
    values = np.asarray(upright.convert("RGBA").getchannel(channel[0].upper()), dtype=np.float32) / 255.0
    mask = torch.from_numpy(values.copy())[None]
    return 1.0 - mask if channel == "alpha" else mask


def load_image_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE and MASK of an image file (ImageFileError when it cannot be used, see image_file_problem)."""
    if not path.is_file():
        raise ImageFileError(_missing(path))
    with decoded_image(path, f"input image {path}") as img:
        return image_and_mask(img)


def load_mask_file(path: Path, channel: str) -> torch.Tensor:
    """MASK (1, H, W) of one channel of an image file (ImageFileError when it cannot be used)."""
    if not path.is_file():
        raise ImageFileError(_missing(path))
    with decoded_image(path, f"input image {path}") as img:
        return channel_mask(img, channel)


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) of an image file as the loaders see it (EXIF orientation applied), from its header alone;
    None when it cannot be read (image_file_problem says why)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return (height, width) if orientation in QUARTER_TURNS else (width, height)


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
