"""IMAGE tensors -> image files: PIL images, the save arguments that embed the workflow, atomic no-clobber writes.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

log = logging.getLogger(__name__)

# File extension of each output format (the formats offered are sampling.parameters.OUTPUT_FORMAT).
EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
# ComfyUI's frontend restores the workflow of a png or webp dropped on it, not of a jpeg (fal's default format).
RESTORABLE_FORMAT = "png"
# A saved image's entry in the save node's `ui` ({filename, subfolder, type}) carries its safety flag under this
# key when the safety check's has_nsfw_concepts is linked in: what the fal routes answer with, even when ComfyUI
# took the safety check's result from its cache and the check did not run again.
SAFETY_FLAG = "has_nsfw_concept"
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


MAX_NAME_ATTEMPTS = 100_000  # counters tried before giving up (the counter has five digits)


def _claim(temp_name: str, target: Path) -> bool:
    """Give the complete temporary file the name `target` unless that name exists: True when claimed.

    A hard link fails if the name exists, so two savers never take the same name. Where the file system has
    no hard links, an O_EXCL create claims the name and the complete file then replaces our own empty claim.
    """
    try:
        os.link(temp_name, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some network / FAT file systems): claim the name, then fill it
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_UMASK))
        except FileExistsError:
            return False
        os.replace(temp_name, target)
        return True


def save_image_no_clobber(image: Image.Image, folder: Path, name_for: Callable[[int], str], counter: int,
                          save_arguments: dict) -> tuple[Path, int]:
    """Write `image` to folder/name_for(counter), taking the next counter while that name exists: -> (path,
    counter used). The image is written to a temporary file first, so a name only ever shows a complete
    image, and an existing file is never replaced (two runs saving to one folder both keep their images)."""
    try:
        handle, temp_name = tempfile.mkstemp(dir=folder, prefix=".krea-", suffix=".tmp")
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
        for _ in range(MAX_NAME_ATTEMPTS):
            target = folder / name_for(counter)
            if _claim(temp_name, target):
                return target, counter
            counter += 1
        raise OSError(f"No free file name in {folder} after {MAX_NAME_ATTEMPTS} tries (last: {target.name}); "
                      "change filename_prefix or clean up the folder.")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_name)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE (H, W, 3) in 0..1 -> an 8-bit RGB PIL image (values rounded, out-of-range ones clamped)."""
    array = (image.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))
