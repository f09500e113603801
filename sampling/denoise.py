"""The Euler flow-matching loop and the text-to-image / image-to-image / inpainting entry point."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inpaint import KnownRegion, as_mask_batch
from .latents import image_ids, make_noise, pack, text_ids, to_model_space, to_raw, unpack
from .schedule import get_schedule, image_to_image_start
from .step_cache import CacheReport, StepCache

# callback(step, total, x0): called after each step with the model-space (B, 16, H/8, W/8) prediction
# of the clean latent; it may raise to stop the run (ComfyUI's interrupt).
StepCallback = Callable[[int, int, torch.Tensor], None]
# velocity(x, t_curr, t_next, step_index) -> v, both (B, L, 64): one model evaluation (or a cached one).
Velocity = Callable[[torch.Tensor, float, float, int], torch.Tensor]
# after_step(x, t_next) -> x: applied to the state after every Euler step, and (with t_next 0) to the clean
# prediction the callback sees; inpainting puts the known region back there (KnownRegion.keep).
AfterStep = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class GenerationSettings:
    width: int
    height: int
    num_steps: int
    guidance: float
    seed: int
    num_images: int
    strength: float = 1.0  # image-to-image only: 1.0 = start from pure noise


def model_velocity(model: torch.nn.Module, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                   vec: torch.Tensor, guidance: float, compute_dtype: torch.dtype) -> Velocity:
    """The plain transformer call, one per step: float32 state in, float32 velocity out.

    `model.forward_orig` is the reference call on packed tokens; ComfyUI's own FLUX has the same method with
    the same arguments, so a FLUX MODEL of a native loader samples through this loop too.
    """
    batch = txt.shape[0]
    guidance_vec = torch.full((batch,), guidance, device=txt.device, dtype=compute_dtype)

    def velocity(x: torch.Tensor, t_curr: float, t_next: float, step: int) -> torch.Tensor:
        t_vec = torch.full((batch,), t_curr, device=x.device, dtype=compute_dtype)
        v = model.forward_orig(x.to(compute_dtype), img_ids, txt, txt_ids, t_vec, vec, guidance_vec)
        return v.float()

    return velocity


def denoise(x: torch.Tensor, timesteps: list[float], velocity: Velocity, latent_size: tuple[int, int],
            callback: StepCallback | None = None, after_step: AfterStep | None = None) -> torch.Tensor:
    """Euler steps x += (t_next - t) * v over consecutive pairs of `timesteps`; x is (B, L, 64) float32."""
    total = len(timesteps) - 1
    for step, (t_curr, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        v = velocity(x, t_curr, t_next, step)
        if callback is not None:
            x0 = x - t_curr * v  # flow matching: x_t = t * noise + (1 - t) * x0
            if after_step is not None:
                x0 = after_step(x0, 0.0)
            callback(step + 1, total, unpack(x0, *latent_size))
        x = x + (t_next - t_curr) * v
        if after_step is not None:
            x = after_step(x, t_next)
    return x


def validate_conditioning(txt: torch.Tensor, vec: torch.Tensor, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a one-prompt conditioning to the batch; refuse batch sizes that do not fit."""
    if txt.ndim != 3 or vec.ndim != 2 or txt.shape[0] != vec.shape[0]:
        raise ValueError(
            f"conditioning has the wrong shape: text embeddings {tuple(txt.shape)} (expected (B, tokens, 4096)), "
            f"pooled {tuple(vec.shape)} (expected (B, 768)). Connect it to a Krea Text Encode or CLIPTextEncode "
            "(FLUX) node.")
    if txt.shape[0] == num_images:
        return txt, vec
    if txt.shape[0] == 1:
        return txt.expand(num_images, -1, -1), vec.expand(num_images, -1)
    raise ValueError(f"conditioning holds {txt.shape[0]} prompts but num_images is {num_images}; "
                     "use one prompt, or as many prompts as images.")


def image_batch(init_latent: torch.Tensor, num_images: int) -> torch.Tensor:
    """A raw (1 or B, 16, H/8, W/8) image latent -> (num_images, 16, H/8, W/8) float32 in model space, CPU."""
    image = to_model_space(init_latent.float().cpu())
    if image.shape[0] == 1 and num_images > 1:
        image = image.expand(num_images, -1, -1, -1)
    return image


def prepare(settings: GenerationSettings, init_latent: torch.Tensor | None,
            noise: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """The starting state (B, L, 64) float32 in model space on the CPU, and the timesteps still to run.

    noise: the seed's (B, 16, H/8, W/8) noise when the caller drew it already (make_noise)."""
    lh, lw = settings.height // 8, settings.width // 8
    if noise is None:
        noise = make_noise(settings.seed, settings.num_images, lh, lw)
    timesteps = get_schedule(settings.num_steps, (lh // 2) * (lw // 2))
    if init_latent is None:
        return pack(noise), timesteps
    start = image_to_image_start(settings.num_steps, settings.strength)
    timesteps = timesteps[start:]
    t0 = timesteps[0]
    image = image_batch(init_latent, settings.num_images)
    return pack(t0 * noise + (1.0 - t0) * image), timesteps


@dataclass(frozen=True)
class Generation:
    latents: torch.Tensor  # raw (B, 16, H/8, W/8) float32 on the CPU
    steps: int  # model evaluations asked for (one per step run)
    cache: CacheReport | None  # what step caching did; None when it was off
    repainted: float | None = None  # inpainting: the fraction of the latent sampled (the rest kept); else None


def generate(model: torch.nn.Module, txt: torch.Tensor, vec: torch.Tensor, settings: GenerationSettings,
             device: torch.device, compute_dtype: torch.dtype, init_latent: torch.Tensor | None = None,
             callback: StepCallback | None = None, cache_threshold: float = 0.0,
             mask: torch.Tensor | None = None) -> Generation:
    """Text-to-image (init_latent None), image-to-image, or inpainting (a mask with the init_latent).

    txt (1 or B, T, 4096), vec (1 or B, 768): the conditioning. cache_threshold > 0 turns on step caching
    for this run only (see step_cache.py); 0 runs every step through the plain model. mask: (1 or B, H, W) at
    the image's resolution, 1 = repaint (see inpaint.py).
    """
    txt, vec = validate_conditioning(txt, vec, settings.num_images)
    lh, lw = settings.height // 8, settings.width // 8
    if init_latent is not None and tuple(init_latent.shape[-2:]) != (lh, lw):
        raise ValueError(f"the image-to-image latent is {init_latent.shape[-1] * 8}x{init_latent.shape[-2] * 8} "
                         f"but the requested size is {settings.width}x{settings.height}.")
    noise = make_noise(settings.seed, settings.num_images, lh, lw)
    known = None
    if mask is not None:
        if init_latent is None:
            raise ValueError("inpainting needs the image: a mask was given without an image latent.")
        known = KnownRegion.build(as_mask_batch(mask), image_batch(init_latent, settings.num_images), noise)
    x, timesteps = prepare(settings, init_latent, noise)
    batch = settings.num_images
    steps = len(timesteps) - 1
    txt = txt.to(device, compute_dtype)
    vec = vec.to(device, compute_dtype)
    cache = StepCache(model, cache_threshold, steps) if cache_threshold > 0 else None
    velocity = model_velocity(cache if cache is not None else model, image_ids(batch, lh, lw).to(device), txt,
                              text_ids(batch, txt.shape[1]).to(device), vec, settings.guidance, compute_dtype)
    after_step = known.to(device).keep if known is not None else None
    x = denoise(x.to(device), timesteps, velocity, (lh, lw), callback, after_step)
    latents = to_raw(unpack(x, lh, lw)).cpu()
    repainted = known.repaint.mean().item() if known is not None else None
    return Generation(latents, steps, cache.report if cache is not None else None, repainted)
