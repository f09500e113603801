"""KreaSampler: text-to-image and image-to-image with the fal endpoint's parameters."""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from ..model_loader.flux import variant_problem
from ..sampling.denoise import GenerationSettings, generate
from ..sampling.gpu_acceleration import gpu_acceleration
from ..sampling.inpaint import as_mask_batch, mask_problem
from ..sampling.interrupt import interrupt_between_blocks
from ..sampling.latents import LATENT_CHANNELS
from ..sampling.parameters import (
    ACCELERATION,
    GUIDANCE_SCALE,
    HEIGHT,
    IMAGE_SIZE,
    NUM_IMAGES,
    NUM_INFERENCE_STEPS,
    SEED,
    SIZE_MULTIPLE,
    STRENGTH,
    WIDTH,
    NumericParameter,
    check_ranges,
    check_side,
    number_problem,
    resolve_size,
)
from ..sampling.step_cache import THRESHOLDS, cache_bytes
from .host import host

log = logging.getLogger(__name__)


def number_options(parameter: NumericParameter, **extra: object) -> dict:
    """A numeric widget's options (default, min, max and step when it has one) from the parameter table."""
    options: dict = {"default": parameter.default, "min": parameter.min, "max": parameter.max}
    if parameter.step is not None:
        options["step"] = parameter.step
    return {**options, **extra}


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


def _step_cache_bytes(latent_shape: tuple[int, ...], hidden: int = 3072) -> int:
    """The step cache's residuals for (B, 16, H/8, W/8) latents, on top of ComfyUI's estimate."""
    batch, _, h, w = latent_shape
    return cache_bytes(batch, (h // 2) * (w // 2), hidden)


def side_problem(name: str, value: object) -> str | None:
    """Why `value` cannot be a custom width or height (None: it can)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be a whole number (a multiple of {SIZE_MULTIPLE}), got {value!r}"
    try:
        check_side(name, value)
    except ValueError as err:
        return str(err)
    return None


def inpainting_mask(mask: object, latent: dict | None, num_images: int) -> torch.Tensor | None:
    """The mask to inpaint with, checked against the latent before anything loads: the mask input, else the
    latent's noise_mask (SetLatentNoiseMask), else None (no inpainting)."""
    noise_mask = latent.get("noise_mask") if isinstance(latent, dict) else None
    if mask is None and noise_mask is None:
        return None
    if latent is None:
        raise ValueError("mask needs the image to inpaint: connect its latent (Krea Encode Image) to latent.")
    if mask is not None and noise_mask is not None:
        log.info("Krea Sampler: the mask input is used; the latent's noise mask (SetLatentNoiseMask) is not.")
    name = "mask" if mask is not None else "the latent's noise_mask"
    batch = as_mask_batch(mask if mask is not None else noise_mask, name)
    samples = latent["samples"]
    problem = mask_problem(batch, samples.shape[2], samples.shape[3], num_images)
    if problem:
        raise ValueError(f"{name}: {problem}.")
    return batch


class KreaSampler:
    DESCRIPTION = ("Generates FLUX.1 Krea [dev] latents exactly as the reference pipeline: text-to-image, or "
                   "image-to-image when a latent is connected (the output then has the input image's size), "
                   "inpainting when a mask is connected too.")
    CATEGORY = "Krea/sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A FLUX.1 model: Krea Model Loader's, or ComfyUI's Load Diffusion "
                                               "Model with a FLUX.1 file (LoRA loaders in between work too)."}),
                "conditioning": ("CONDITIONING",),
                "image_size": (list(IMAGE_SIZE.choices), {
                    "default": IMAGE_SIZE.default, "tooltip": "fal's sizes; 'custom' uses width and height."}),
                "width": ("INT", number_options(WIDTH, tooltip="Used when image_size is custom (multiple of 16).")),
                "height": ("INT", number_options(HEIGHT, tooltip="Used when image_size is custom (multiple of 16).")),
                "num_inference_steps": ("INT", number_options(
                    NUM_INFERENCE_STEPS, tooltip="Denoising steps, one model call each (fal's default: 28).")),
                "guidance_scale": ("FLOAT", number_options(
                    GUIDANCE_SCALE, tooltip="Distilled guidance (one model call per step).")),
                "seed": ("INT", number_options(
                    SEED, control_after_generate=True,
                    tooltip="The noise the image starts from: the same seed and inputs give the same image.")),
                "num_images": ("INT", number_options(
                    NUM_IMAGES, tooltip="How many images to make at once, as one batch; the first is the "
                                        "image that 1 would give.")),
                "acceleration": (list(ACCELERATION.choices), {
                    "default": ACCELERATION.default,
                    "tooltip": "none: the reference computation. regular / high: reuse the transformer's work on "
                               "steps that change little (high reuses more); on GPUs also fp8 matmuls and "
                               "torch.compile."}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Image-to-image: the encoded input image."}),
                "strength": ("FLOAT", number_options(
                    STRENGTH, tooltip="Image-to-image: how much of the image is redrawn.")),
                "mask": ("MASK", {"tooltip": "Inpainting (with a latent): the region to repaint, white (1), at the "
                                             "input image's size; the rest of the image is kept. Values from 0.5 up "
                                             "count as white. Takes the place of a noise mask the latent carries "
                                             "(SetLatentNoiseMask), which is used when this is not connected."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width: int | None, height: int | None, guidance_scale: float | None = None,
                        strength: float | None = None) -> bool | str:
        # ComfyUI skips its own min/max checks for inputs named here, so the range is checked in full.
        # A linked input arrives as None: its value is checked when the node runs. guidance_scale and
        # strength are here because ComfyUI's own check lets NaN through (every comparison with NaN is
        # false), which would only be found when the sampler runs, after the text encoders loaded.
        # One problem a line, each starting with its input (ComfyUI lists the text under every input taken).
        problems = [number_problem(parameter.name, value, parameter.min, parameter.max)
                    for parameter, value in ((GUIDANCE_SCALE, guidance_scale), (STRENGTH, strength))
                    if value is not None]
        problems += [side_problem(name, value) for name, value in ((WIDTH.name, width), (HEIGHT.name, height))
                     if value is not None]
        found = [problem for problem in problems if problem is not None]
        return "\n".join(found) if found else True

    def sample(self, model: object, conditioning: list, image_size: str, width: int, height: int,
               num_inference_steps: int, guidance_scale: float, seed: int, num_images: int, acceleration: str,
               latent: dict | None = None, strength: float = STRENGTH.default,
               mask: torch.Tensor | None = None) -> dict:
        check_ranges(num_inference_steps, guidance_scale, seed, num_images, strength)
        ACCELERATION.check(acceleration)
        init = None
        if latent is None:
            width, height = resolve_size(image_size, width, height)
            strength = 1.0
        else:
            init = latent["samples"]
            if init.ndim != 4 or init.shape[1] != LATENT_CHANNELS:
                raise ValueError(f"latent has shape {tuple(init.shape)}; FLUX needs (B, {LATENT_CHANNELS}, H/8, "
                                 "W/8) latents from Krea Encode Image (or a FLUX VAE Encode).")
            if init.shape[2] % 2 or init.shape[3] % 2:
                raise ValueError(f"the input image is {init.shape[3] * 8}x{init.shape[2] * 8}; FLUX needs sides "
                                 "that are multiples of 16 (Krea Encode Image resizes for you).")
            if init.shape[0] not in (1, num_images):
                raise ValueError(f"latent holds {init.shape[0]} images but num_images is {num_images}.")
            height, width = init.shape[2] * 8, init.shape[3] * 8
        mask = inpainting_mask(mask, latent, num_images)
        txt, pooled = unpack_conditioning(conditioning)
        settings = GenerationSettings(width=width, height=height, num_steps=num_inference_steps,
                                      guidance=guidance_scale, seed=seed, num_images=num_images, strength=strength)
        threshold = THRESHOLDS[acceleration]
        latent_shape = (num_images, LATENT_CHANNELS, height // 8, width // 8)
        flux = host.loaded_transformer(model, latent_shape, _step_cache_bytes(latent_shape) if threshold > 0 else 0)
        problem = variant_problem(flux.module.img_in.weight.shape[1])  # (ComfyUI's host refuses before loading)
        if problem is not None:
            raise ValueError(problem)
        notes = []
        if threshold > 0 and not flux.is_pack_model:
            notes.append("step caching needs the Krea transformer (Krea Model Loader); this model ran every step")
            threshold = 0.0
        started = time.perf_counter()
        with contextlib.ExitStack() as stack:
            if threshold > 0:
                notes += stack.enter_context(
                    gpu_acceleration(flux.module, flux.device, compile_blocks=not flux.streamed))
            stack.enter_context(interrupt_between_blocks(flux.module, host.block_interrupt_check()))
            result = generate(flux.module, txt, pooled, settings, flux.device, flux.compute_dtype, init_latent=init,
                              callback=host.progress_callback(num_inference_steps), cache_threshold=threshold,
                              mask=mask)
        report = f"acceleration {acceleration}: "
        if result.cache is None:
            report += f"{result.steps} of {result.steps} steps computed fully"
        else:
            report += result.cache.summary()
        if result.repainted is not None:
            report += f"; inpainting: {result.repainted:.0%} of the image repainted"
            if result.repainted == 0:
                report += " (the mask is empty: the image is kept as it is)"
        if notes:
            report += f"; {', '.join(notes)}"
        log.info(report)
        computed = result.steps if result.cache is None else result.cache.full_steps
        # The same report as fields, for the browser's badges (web/krea.js): ui values are lists.
        fields = {"acceleration": acceleration, "steps": result.steps, "computed": computed,
                  "reused": result.steps - computed, "seconds": round(time.perf_counter() - started, 3),
                  "width": width, "height": height, "images": num_images}
        return {"ui": {"text": [report], "krea_report": [fields]},
                "result": ({"samples": result.latents.to(host.intermediate_device())},)}


NODE_CLASS_MAPPINGS = {"KreaSampler": KreaSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"KreaSampler": "Krea Sampler"}
