"""IMAGE tensors -> image files: PIL images, the save arguments that embed the workflow, atomic writes.

Saved files carry the workflow the way ComfyUI writes it: PNG text chunks `prompt` and `workflow`; WebP and
JPEG EXIF tags 0x0110 (Model) = "prompt:<json>" and 0x010F (Make) = "workflow:<json>" (further extra_pnginfo
keys on 0x010E, 0x010D...), as ComfyUI's SaveAnimatedWEBP writes them and its frontend reads them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger(__name__)

# File extension of each output format (the formats offered are sampling.parameters.OUTPUT_FORMAT).
EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_PNG_COMPRESS_LEVEL = 4  # ComfyUI's SaveImage level; PNG is lossless, so `quality` does not apply to it
_EXIF_PROMPT_TAG = 0x0110  # Model
_EXIF_FIRST_EXTRA_TAG = 0x010F  # Make ("workflow"); later extra_pnginfo keys count down from here
_JPEG_EXIF_LIMIT = 65533  # one APP1 segment; the EXIF payload cannot be longer in a JPEG


def _exif(prompt: Any, extra_pnginfo: dict | None, with_extra: bool = True) -> Image.Exif:
    exif = Image.Exif()
    if prompt is not None:
        exif[_EXIF_PROMPT_TAG] = "prompt:" + json.dumps(prompt)
    if extra_pnginfo and with_extra:
        for offset, (key, value) in enumerate(extra_pnginfo.items()):
            exif[_EXIF_FIRST_EXTRA_TAG - offset] = f"{key}:{json.dumps(value)}"
    return exif


def _jpeg_exif(prompt: Any, extra_pnginfo: dict | None) -> bytes:
    """EXIF for a JPEG: everything if it fits one APP1 segment, else the prompt only, else nothing."""
    for with_extra in (True, False):
        exif = _exif(prompt, extra_pnginfo, with_extra)
        if not len(exif):
            return b""
        data = exif.tobytes()
        if len(data) <= _JPEG_EXIF_LIMIT:
            if not with_extra and extra_pnginfo:
                log.warning("The workflow is too large for JPEG EXIF (64 KB); only the prompt is embedded. "
                            "Save as png or webp to keep the workflow.")
            return data
    log.warning("The prompt is too large for JPEG EXIF (64 KB); no metadata is embedded. "
                "Save as png or webp to keep it.")
    return b""


def save_arguments(output_format: str, quality: int, prompt: Any, extra_pnginfo: dict | None) -> dict:
    """The keyword arguments of PIL's Image.save for one output format, with the prompt and workflow embedded
    (None for both: no metadata)."""
    if output_format == "png":
        info = PngInfo()
        if prompt is not None:
            info.add_text("prompt", json.dumps(prompt))
        for key, value in (extra_pnginfo or {}).items():
            info.add_text(key, json.dumps(value))
        return {"format": "PNG", "pnginfo": info, "compress_level": _PNG_COMPRESS_LEVEL}
    if output_format == "webp":
        exif = _exif(prompt, extra_pnginfo)
        return {"format": "WEBP", "quality": quality, **({"exif": exif.tobytes()} if len(exif) else {})}
    exif_bytes = _jpeg_exif(prompt, extra_pnginfo)
    return {"format": "JPEG", "quality": quality, **({"exif": exif_bytes} if exif_bytes else {})}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe while saving.
_UMASK = _current_umask()


def write_image_atomically(image: Image.Image, folder: Path, name: str, save_arguments: dict) -> Path:
    """Write `image` to folder/name through a temporary file in the same folder and os.replace, so the name
    only ever shows a complete image; the temporary file is removed if anything fails."""
    try:
        handle, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(f"Cannot write images to the output folder {folder}: {e.strerror or e}. Check that it "
                      "exists and is writable, or change the output folder / filename_prefix.") from e
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, **save_arguments)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.chmod(temp_name, 0o666 & ~_UMASK)
        target = folder / name
        os.replace(temp_name, target)
        return target
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_name)
        raise


def to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE (H, W, 3) in 0..1 -> an 8-bit RGB PIL image (values rounded, out-of-range ones clamped)."""
    array = (image.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))
