"""KreaSampler: text-to-image and image-to-image with the fal endpoint's parameters."""
from __future__ import annotations

import contextlib
import logging

import torch

from ..sampling.denoise import GenerationSettings, generate
from ..sampling.gpu_acceleration import gpu_acceleration
from ..sampling.step_cache import THRESHOLDS
from . import host
from .handles import TransformerHandle

log = logging.getLogger(__name__)

# fal's image_size presets, (width, height).
IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
MAX_SIDE = 14142
ACCELERATIONS = list(THRESHOLDS)  # none, regular, high
SEED_MAX = 0xFFFFFFFFFFFFFFFF


def check_side(name: str, value: int) -> None:
    if not 16 <= value <= MAX_SIDE or value % 16:
        raise ValueError(f"{name} must be a multiple of 16 between 16 and {MAX_SIDE}, got {value}.")


def resolve_size(image_size: str, width: int, height: int) -> tuple[int, int]:
    if image_size == "custom":
        check_side("width", width)
        check_side("height", height)
        return width, height
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size {image_size!r} is not one of {', '.join([*IMAGE_SIZES, 'custom'])}.")
    return IMAGE_SIZES[image_size]


def check_ranges(num_inference_steps: int, guidance_scale: float, seed: int, num_images: int,
                 strength: float) -> None:
    """The fal ranges, refused before any model is loaded (ComfyUI checks them too; the CLI and direct
    callers rely on this)."""
    checks = [
        ("num_inference_steps", num_inference_steps, 1, 50),
        ("guidance_scale", guidance_scale, 1.0, 20.0),
        ("seed", seed, 0, SEED_MAX),
        ("num_images", num_images, 1, 4),
        ("strength", strength, 0.01, 1.0),
    ]
    for name, value, low, high in checks:
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low} and {high}, got {value}.")


def compute_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """float32 on the CPU (whatever the storage: CPUs are slow and inexact in half precision); on a GPU the
    model's own compute dtype (bf16 for bf16/fp8 storage, fp16 for fp16), never float32."""
    if device.type == "cpu":
        return torch.float32
    return model.compute_dtype if model.compute_dtype != torch.float32 else torch.bfloat16


def unpack_conditioning(conditioning: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(txt (B, T, 4096), pooled (B, 768)) from a CONDITIONING with one entry."""
    if not conditioning:
        raise ValueError("conditioning is empty; connect a Krea Text Encode node.")
    if len(conditioning) > 1:
        log.warning("conditioning holds %d entries; KreaSampler uses the first.", len(conditioning))
    txt, extras = conditioning[0][0], conditioning[0][1]
    if "guidance" in extras:
        log.info("conditioning carries guidance %s (FluxGuidance); KreaSampler uses its guidance_scale input.",
                 extras["guidance"])
    pooled = extras.get("pooled_output")
    if pooled is None:
        raise ValueError("conditioning has no pooled_output (the CLIP-L vector FLUX needs); encode the prompt "
                         "with Krea Text Encode or a FLUX CLIPTextEncode.")
    return txt, pooled


class KreaSampler:
    DESCRIPTION = ("Generates FLUX.1 Krea [dev] latents exactly as the reference pipeline: text-to-image, or "
                   "image-to-image when a latent is connected (the output then has the input image's size).")
    CATEGORY = "Krea/sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("KREA_MODEL",),
                "conditioning": ("CONDITIONING",),
                "image_size": ([*IMAGE_SIZES, "custom"], {
                    "default": "landscape_4_3", "tooltip": "fal's sizes; 'custom' uses width and height."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": MAX_SIDE, "step": 16,
                                  "tooltip": "Used when image_size is custom (multiple of 16)."}),
                "height": ("INT", {"default": 768, "min": 16, "max": MAX_SIDE, "step": 16,
                                   "tooltip": "Used when image_size is custom (multiple of 16)."}),
                "num_inference_steps": ("INT", {"default": 28, "min": 1, "max": 50}),
                "guidance_scale": ("FLOAT", {"default": 4.5, "min": 1.0, "max": 20.0, "step": 0.1,
                                             "tooltip": "Distilled guidance (one model call per step)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
                "num_images": ("INT", {"default": 1, "min": 1, "max": 4}),
                "acceleration": (ACCELERATIONS, {
                    "default": "none",
                    "tooltip": "none: the reference computation. regular / high: reuse the transformer's work on "
                               "steps that change little (high reuses more); on GPUs also fp8 matmuls and "
                               "torch.compile."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Image-to-image: the encoded input image."}),
                "strength": ("FLOAT", {"default": 0.95, "min": 0.01, "max": 1.0, "step": 0.01,
                                       "tooltip": "Image-to-image: how much of the image is redrawn."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width: int, height: int) -> bool | str:
        # ComfyUI skips its own min/max checks for inputs named here, so the range is checked in full.
        for name, value in (("width", width), ("height", height)):
            try:
                check_side(name, value)
            except ValueError as err:
                return str(err)
        return True

    def sample(self, model: TransformerHandle, conditioning: list, image_size: str, width: int, height: int,
               num_inference_steps: int, guidance_scale: float, seed: int, num_images: int, acceleration: str,
               latent: dict | None = None, strength: float = 0.95) -> dict:
        check_ranges(num_inference_steps, guidance_scale, seed, num_images, strength)
        if acceleration not in ACCELERATIONS:
            raise ValueError(f"acceleration {acceleration!r} is not one of {', '.join(ACCELERATIONS)}.")
        init = None
        if latent is None:
            width, height = resolve_size(image_size, width, height)
            strength = 1.0
        else:
            init = latent["samples"]
            if init.ndim != 4 or init.shape[1] != 16:
                raise ValueError(f"latent has shape {tuple(init.shape)}; FLUX needs (B, 16, H/8, W/8) latents "
                                 "from Krea Encode Image (or a FLUX VAE Encode).")
            if init.shape[2] % 2 or init.shape[3] % 2:
                raise ValueError(f"the input image is {init.shape[3] * 8}x{init.shape[2] * 8}; FLUX needs sides "
                                 "that are multiples of 16 (Krea Encode Image resizes for you).")
            if init.shape[0] not in (1, num_images):
                raise ValueError(f"latent holds {init.shape[0]} images but num_images is {num_images}.")
            height, width = init.shape[2] * 8, init.shape[3] * 8
        txt, pooled = unpack_conditioning(conditioning)
        settings = GenerationSettings(width=width, height=height, num_steps=num_inference_steps,
                                      guidance=guidance_scale, seed=seed, num_images=num_images, strength=strength)
        flux = model.load()
        if flux.config.in_channels != 64:
            raise ValueError(f"{model.path.name} is a FLUX variant with {flux.config.in_channels} input channels "
                             "(e.g. FLUX Fill or Redux); KreaSampler runs text-to-image FLUX.1 models (64).")
        dtype = compute_dtype(flux, model.device)
        threshold = THRESHOLDS[acceleration]
        with contextlib.ExitStack() as stack:
            extras = stack.enter_context(gpu_acceleration(flux, model.device)) if threshold > 0 else []
            result = generate(flux, txt, pooled, settings, model.device, dtype, init_latent=init,
                              callback=host.progress_callback(num_inference_steps), cache_threshold=threshold)
        report = f"acceleration {acceleration}: "
        if result.cache is None:
            report += f"{result.steps} of {result.steps} steps computed fully"
        else:
            report += result.cache.summary()
        if extras:
            report += f"; {', '.join(extras)}"
        log.info(report)
        return {"ui": {"text": [report]}, "result": ({"samples": result.latents.to(host.intermediate_device())},)}


NODE_CLASS_MAPPINGS = {"KreaSampler": KreaSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"KreaSampler": "Krea Sampler"}
