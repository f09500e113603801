"""Image in, image out: KreaEncodeImage (IMAGE -> LATENT), KreaDecode (LATENT -> IMAGE), KreaSaveImage.

LATENT holds raw 16-channel FLUX latents (as native VAEEncode/VAEDecode), IMAGE is float32 (B, H, W, 3) in
0..1. Saved files carry the workflow the way ComfyUI writes it: PNG text chunks `prompt` and `workflow`;
WebP and JPEG EXIF tags 0x0110 (Model) = "prompt:<json>" and 0x010F (Make) = "workflow:<json>" (further
extra_pnginfo keys on 0x010E, 0x010D...), as ComfyUI's SaveAnimatedWEBP writes them and its frontend reads them.
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
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import host
from .handles import VaeHandle

log = logging.getLogger(__name__)

FLUX_LATENT_CHANNELS = 16
SIZE_MULTIPLE = 16  # the transformer packs 2x2 latent pixels, and a latent pixel is 8 image pixels
OUTPUT_FORMATS = ["jpeg", "png", "webp"]
_EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_PNG_COMPRESS_LEVEL = 4  # ComfyUI's SaveImage level; PNG is lossless, so `quality` does not apply to it
_EXIF_PROMPT_TAG = 0x0110  # Model
_EXIF_FIRST_EXTRA_TAG = 0x010F  # Make ("workflow"); later extra_pnginfo keys count down from here
_JPEG_EXIF_LIMIT = 65533  # one APP1 segment; the EXIF payload cannot be longer in a JPEG


def as_image_batch(image: Any, name: str) -> torch.Tensor:
    """An IMAGE input as float32 (B, H, W, 3), or a ValueError that says what was wrong and how to fix it.

    RGBA images lose their alpha channel (as ComfyUI's VAEEncode does), with a log line.
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"{name} must be an IMAGE (a tensor of shape (batch, height, width, 3)), "
                         f"got {type(image).__name__}.")
    if image.ndim == 3:
        raise ValueError(f"{name} has shape {tuple(image.shape)}: a single image without a batch dimension. "
                         "IMAGE is (batch, height, width, 3); use image[None] or a node that outputs IMAGE.")
    if image.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (batch, height, width, 3), got shape "
                         f"{tuple(image.shape)}.")
    channels = image.shape[-1]
    if channels == 4:
        log.info("%s is RGBA: its alpha channel is dropped.", name)
        image = image[..., :3]
    elif channels != 3:
        if channels == 1:
            hint = " It is a grayscale image; convert it to RGB (3 channels) first."
        elif image.shape[1] in (1, 3, 4):
            hint = " It looks channels-first (batch, channels, height, width); IMAGE is channels-last."
        else:
            hint = ""
        raise ValueError(f"{name} must have 3 colour channels in its last dimension (batch, height, width, 3), "
                         f"got shape {tuple(image.shape)}.{hint}")
    if min(image.shape[:3]) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(image.shape)}).")
    return image.float()


def nearest_multiple(size: int, multiple: int = SIZE_MULTIPLE) -> int:
    return max(multiple, (size + multiple // 2) // multiple * multiple)  # halves round up


class KreaEncodeImage:
    DESCRIPTION = ("Encodes images into FLUX latents with the autoencoder (for image-to-image). Sides that are "
                   "not multiples of 16 are resized to the nearest multiple of 16.")
    CATEGORY = "Krea/image"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": ("KREA_VAE", {"tooltip": "The autoencoder from Krea Model Loader."}),
                "image": ("IMAGE", {"tooltip": "RGB images; an alpha channel is dropped."}),
            },
        }

    def encode(self, vae: VaeHandle, image: torch.Tensor) -> tuple[dict]:
        images = as_image_batch(image, "image")
        host.throw_if_interrupted()
        _, height, width, _ = images.shape
        pixels = images.permute(0, 3, 1, 2)  # (B, 3, H, W)
        new_h, new_w = nearest_multiple(height), nearest_multiple(width)
        if (new_h, new_w) != (height, width):
            log.info("Krea Encode Image: resizing %dx%d to %dx%d (sides must be multiples of %d).",
                     width, height, new_w, new_h, SIZE_MULTIPLE)
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False,
                                   antialias=True).clamp_(0.0, 1.0)
        model = vae.load()
        latents = model.encode(pixels * 2.0 - 1.0, callback=host.work_progress(1))
        return ({"samples": latents.to(host.intermediate_device())},)


def _latent_tensor(samples: Any) -> torch.Tensor:
    latent = samples.get("samples") if isinstance(samples, dict) else None
    if not isinstance(latent, torch.Tensor):
        raise ValueError("samples must be a LATENT (a dict holding a 'samples' tensor of shape (batch, 16, h, w)).")
    if latent.ndim != 4:
        raise ValueError(f"samples has shape {tuple(latent.shape)}; FLUX latents are (batch, 16, height/8, "
                         "width/8). Video or audio latents cannot be decoded here.")
    channels = latent.shape[1]
    if channels != FLUX_LATENT_CHANNELS:
        other = " (a Stable Diffusion 1.x/SDXL latent)" if channels == 4 else ""
        raise ValueError(f"samples has {channels} channels{other}; Krea Decode needs a {FLUX_LATENT_CHANNELS}-"
                         "channel FLUX latent, from Krea Sampler, Krea Encode Image or EmptySD3LatentImage.")
    if min(latent.shape) == 0:
        raise ValueError(f"samples is empty (shape {tuple(latent.shape)}).")
    return latent


class KreaDecode:
    DESCRIPTION = ("Decodes FLUX latents into images with the autoencoder. Large images are decoded in "
                   "overlapping tiles when they would not fit in memory.")
    CATEGORY = "Krea/image"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae": ("KREA_VAE", {"tooltip": "The autoencoder from Krea Model Loader."}),
                "samples": ("LATENT", {"tooltip": "16-channel FLUX latents, e.g. from Krea Sampler."}),
            },
        }

    def decode(self, vae: VaeHandle, samples: dict) -> tuple[torch.Tensor]:
        latent = _latent_tensor(samples)
        host.throw_if_interrupted()
        model = vae.load()
        pixels = model.decode(latent.float(), callback=host.work_progress(1))  # (B, 3, H, W) in [-1, 1]
        images = ((pixels + 1.0) * 0.5).clamp_(0.0, 1.0).permute(0, 2, 3, 1)
        return (images.to("cpu", torch.float32).contiguous(),)


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


def _save_arguments(output_format: str, quality: int, prompt: Any, extra_pnginfo: dict | None) -> dict:
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


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.detach().to("cpu", torch.float32).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))  # (H, W, 3) uint8: RGB


class KreaSaveImage:
    DESCRIPTION = ("Saves images to the ComfyUI output folder as jpeg (default, as fal), png or webp, with the "
                   "prompt and workflow embedded so the file can be dropped back into ComfyUI.")
    CATEGORY = "Krea/image"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {
                    "default": "krea/krea",
                    "tooltip": "File name prefix inside the output folder; a '/' makes sub-folders. "
                               "%batch_num% is replaced by the image's index in the batch."}),
                "output_format": (OUTPUT_FORMATS, {
                    "default": "jpeg", "tooltip": "jpeg (as fal), png (lossless) or webp."}),
                "quality": ("INT", {
                    "default": 95, "min": 1, "max": 100, "step": 1,
                    "tooltip": "jpeg and webp quality (1-100). png is lossless and ignores it."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images: torch.Tensor, filename_prefix: str = "krea/krea", output_format: str = "jpeg",
             quality: int = 95, prompt: Any = None, extra_pnginfo: dict | None = None) -> dict:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}.")
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an integer from 1 to 100, got {quality!r}.")
        if not isinstance(filename_prefix, str) or not filename_prefix.strip():
            raise ValueError("filename_prefix must not be empty (e.g. 'krea/krea').")
        if extra_pnginfo is not None and not isinstance(extra_pnginfo, dict):
            extra_pnginfo = None
        if not host.metadata_enabled():  # ComfyUI's --disable-metadata
            prompt, extra_pnginfo = None, None
        batch = as_image_batch(images, "images")
        height, width = batch.shape[1], batch.shape[2]
        folder, filename, counter, subfolder = host.save_image_path(filename_prefix, width, height)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"Cannot create the output folder {folder}: {e.strerror or e}. Check the output "
                          "folder's permissions, or change filename_prefix.") from e
        arguments = _save_arguments(output_format, quality, prompt, extra_pnginfo)
        results = []
        for index, image in enumerate(batch):
            host.throw_if_interrupted()
            name = f"{filename.replace('%batch_num%', str(index))}_{counter:05}_.{_EXTENSIONS[output_format]}"
            write_image_atomically(_to_pil(image), folder, name, arguments)
            results.append({"filename": name, "subfolder": subfolder, "type": "output"})
            counter += 1
        log.info("Saved %d image(s) to %s.", len(results), folder)
        return {"ui": {"images": results}}


NODE_CLASS_MAPPINGS = {
    "KreaEncodeImage": KreaEncodeImage,
    "KreaDecode": KreaDecode,
    "KreaSaveImage": KreaSaveImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KreaEncodeImage": "Krea Encode Image",
    "KreaDecode": "Krea Decode",
    "KreaSaveImage": "Krea Save Image",
}
