"""Image in, image out: KreaEncodeImage (IMAGE -> LATENT), KreaDecode (LATENT -> IMAGE), KreaSaveImage.

LATENT holds raw 16-channel FLUX latents (as native VAEEncode/VAEDecode), IMAGE is float32 (B, H, W, 3) in
0..1. The nodes check their inputs and call the VAE they are given through the host (Krea Model Loader's, or
inside ComfyUI any FLUX VAE) and image_io.save (file writing and metadata).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from ..image_io.save import EXTENSIONS, save_arguments, save_image_no_clobber, to_pil
from ..sampling.latents import LATENT_CHANNELS
from ..sampling.parameters import OUTPUT_FORMAT, SIZE_MULTIPLE, nearest_multiple
from .host import host

log = logging.getLogger(__name__)

VAE_TOOLTIP = "FLUX's autoencoder: the vae output of Krea Model Loader, or inside ComfyUI VAELoader's ae.safetensors."


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
                "vae": ("VAE", {"tooltip": VAE_TOOLTIP}),
                "image": ("IMAGE", {"tooltip": "RGB images; an alpha channel is dropped."}),
            },
        }

    def encode(self, vae: Any, image: torch.Tensor) -> tuple[dict]:
        images = as_image_batch(image, "image")
        host.throw_if_interrupted()
        _, height, width, _ = images.shape
        new_h, new_w = nearest_multiple(height), nearest_multiple(width)
        if (new_h, new_w) != (height, width):
            log.info("Krea Encode Image: resizing %dx%d to %dx%d (sides must be multiples of %d).",
                     width, height, new_w, new_h, SIZE_MULTIPLE)
            pixels = F.interpolate(images.permute(0, 3, 1, 2), size=(new_h, new_w), mode="bicubic",
                                   align_corners=False, antialias=True).clamp_(0.0, 1.0)
            images = pixels.permute(0, 2, 3, 1)
        latents = host.encode_pixels(vae, images)
        return ({"samples": latents.to(host.intermediate_device())},)


def _latent_tensor(samples: Any) -> torch.Tensor:
    latent = samples.get("samples") if isinstance(samples, dict) else None
    if not isinstance(latent, torch.Tensor):
        raise ValueError("samples must be a LATENT (a dict holding a 'samples' tensor of shape (batch, 16, h, w)).")
    if latent.ndim != 4:
        raise ValueError(f"samples has shape {tuple(latent.shape)}; FLUX latents are (batch, 16, height/8, "
                         "width/8). Video or audio latents cannot be decoded here.")
    channels = latent.shape[1]
    if channels != LATENT_CHANNELS:
        other = " (a Stable Diffusion 1.x/SDXL latent)" if channels == 4 else ""
        raise ValueError(f"samples has {channels} channels{other}; Krea Decode needs a {LATENT_CHANNELS}-"
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
                "vae": ("VAE", {"tooltip": VAE_TOOLTIP}),
                "samples": ("LATENT", {"tooltip": "16-channel FLUX latents, e.g. from Krea Sampler."}),
            },
        }

    def decode(self, vae: Any, samples: dict) -> tuple[torch.Tensor]:
        latent = _latent_tensor(samples)
        host.throw_if_interrupted()
        return (host.decode_latents(vae, latent.float()),)


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
                "output_format": (list(OUTPUT_FORMAT.choices), {
                    "default": OUTPUT_FORMAT.default, "tooltip": "jpeg (as fal), png (lossless) or webp."}),
                "quality": ("INT", {
                    "default": 95, "min": 1, "max": 100, "step": 1,
                    "tooltip": "jpeg and webp quality (1-100). png is lossless and ignores it."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None) -> bool | str:
        # Before any work: the prefix stays inside the output folder and that folder can be written to.
        # (ComfyUI turns the value into a string before this runs; the server-less runner does not, so the type
        # is checked too.)
        if filename_prefix is None:  # linked: checked when the node runs
            return True
        if not isinstance(filename_prefix, str) or not filename_prefix.strip():
            return f"filename_prefix must be a non-empty text such as 'krea/krea'; got {filename_prefix!r}"
        problem = host.save_folder_problem(filename_prefix)
        return problem if problem is not None else True

    def save(self, images: torch.Tensor, filename_prefix: str = "krea/krea",
             output_format: str = OUTPUT_FORMAT.default, quality: int = 95, prompt: Any = None,
             extra_pnginfo: dict | None = None) -> dict:
        OUTPUT_FORMAT.check(output_format)
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
        arguments = save_arguments(output_format, quality, prompt, extra_pnginfo)
        results = []
        extension = EXTENSIONS[output_format]
        for index, image in enumerate(batch):
            host.throw_if_interrupted()
            base = filename.replace("%batch_num%", str(index))
            # The counter is the host's first free one (a folder scan); when another run took that name in the
            # meantime, the next free counter is used: no existing file is ever replaced.
            path, counter = save_image_no_clobber(to_pil(image), folder,
                                                  lambda c, base=base: f"{base}_{c:05}_.{extension}", counter,
                                                  arguments)
            results.append({"filename": path.name, "subfolder": subfolder, "type": "output"})
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
