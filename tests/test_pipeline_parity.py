"""Whole sampling runs against diffusers' FluxPipeline (and FluxInpaintPipeline for inpainting): same weights,
conditioning and initial noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxInpaintPipeline, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from comfyui_krea.model_loader.flux import load_flux, write_random_flux_checkpoint
from comfyui_krea.sampling.denoise import GenerationSettings, generate, prepare
from comfyui_krea.sampling.latents import make_noise, pack, to_model_space
from comfyui_krea.sampling.schedule import get_schedule, image_to_image_start
from conftest import TINY_FLUX, rel_err


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1-dev's scheduler config
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline_parity")
    ours = load_flux(write_random_flux_checkpoint(folder / "bfl.safetensors", TINY_FLUX, seed=5))
    theirs = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=64, num_layers=TINY_FLUX.depth,
        num_single_layers=TINY_FLUX.depth_single_blocks, attention_head_dim=TINY_FLUX.head_dim,
        num_attention_heads=TINY_FLUX.num_heads, joint_attention_dim=TINY_FLUX.context_in_dim,
        pooled_projection_dim=TINY_FLUX.vec_in_dim, guidance_embeds=True, axes_dims_rope=TINY_FLUX.axes_dim).eval()
    theirs.load_state_dict(load_file(write_random_flux_checkpoint(
        folder / "diffusers.safetensors", TINY_FLUX, seed=5, layout="diffusers")), strict=True)
    pipe = FluxPipeline(scheduler=scheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=theirs)
    return ours, pipe


def conditioning(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 7, TINY_FLUX.context_in_dim, generator=gen), torch.randn(batch, TINY_FLUX.vec_in_dim,
                                                                                  generator=gen)


def run_diffusers(pipe, txt, vec, start_latents, width, height, steps, guidance, sigmas=None):
    with torch.no_grad():
        out = pipe(prompt_embeds=txt, pooled_prompt_embeds=vec, latents=start_latents, width=width, height=height,
                   num_inference_steps=steps, guidance_scale=guidance, output_type="latent", sigmas=sigmas)
    return out.images  # packed (B, L, 64), model space


@pytest.mark.parametrize("width,height,steps,guidance,num_images", [
    (64, 64, 4, 4.5, 1), (96, 64, 6, 3.5, 2), (64, 128, 3, 1.0, 1)])
def test_text_to_image_matches_flux_pipeline(models, width, height, steps, guidance, num_images):
    ours, pipe = models
    txt, vec = conditioning(1)
    settings = GenerationSettings(width=width, height=height, num_steps=steps, guidance=guidance, seed=11,
                                  num_images=num_images)
    raw = generate(ours, txt, vec, settings, torch.device("cpu"), torch.float32).latents
    noise = pack(make_noise(11, num_images, height // 8, width // 8))
    reference = run_diffusers(pipe, txt.expand(num_images, -1, -1), vec.expand(num_images, -1), noise, width,
                              height, steps, guidance)
    assert rel_err(pack(to_model_space(raw)), reference) < 1e-4


def test_image_to_image_matches_diffusers_schedule_and_noising(models):
    ours, pipe = models
    width, height, steps, strength = 64, 96, 10, 0.6
    txt, vec = conditioning(1, seed=1)
    image_latent = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(2))
    settings = GenerationSettings(width=width, height=height, num_steps=steps, guidance=4.5, seed=3, num_images=1,
                                  strength=strength)
    raw = generate(ours, txt, vec, settings, torch.device("cpu"), torch.float32, init_latent=image_latent).latents

    # diffusers FluxImg2ImgPipeline: shifted sigmas of the full schedule, from t_start on; start latents by
    # scheduler.scale_noise(image, sigma_start, noise).
    start = image_to_image_start(steps, strength)
    sched = scheduler()
    seq_len = (height // 16) * (width // 16)
    from comfyui_krea.sampling.schedule import shift_mu

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(seq_len))
    sched.set_begin_index(start)
    noise = pack(make_noise(3, 1, height // 8, width // 8))
    image = pack(to_model_space(image_latent))
    started = sched.scale_noise(image, sched.timesteps[start:start + 1], noise)
    ours_start, ours_steps = prepare(settings, image_latent)
    assert torch.allclose(ours_start, started, atol=1e-6)
    assert np.allclose(ours_steps, get_schedule(steps, seq_len)[start:])
    reference = run_diffusers(pipe, txt, vec, started, width, height, steps - start, 4.5,
                              sigmas=np.linspace(1.0, 1 / steps, steps)[start:])
    assert rel_err(pack(to_model_space(raw)), reference) < 1e-4


def test_first_image_of_a_batch_is_the_single_image(models):
    ours, _ = models
    txt, vec = conditioning(1, seed=4)
    base = dict(width=64, height=64, num_steps=3, guidance=4.5, seed=99)
    cpu = torch.device("cpu")
    single = generate(ours, txt, vec, GenerationSettings(num_images=1, **base), cpu, torch.float32).latents
    batch = generate(ours, txt, vec, GenerationSettings(num_images=3, **base), cpu, torch.float32).latents
    assert torch.allclose(batch[0], single[0], atol=1e-5)
    assert not torch.allclose(batch[1], single[0], atol=1e-2)


# ------------------------------------------------------------------------------------------------- inpainting

def run_diffusers_inpaint(pipe, txt, vec, image, mask, width, height, steps, guidance, strength, seed, num_images):
    """FluxInpaintPipeline on a model-space image latent (it takes 16-channel images as latents, unencoded) and a
    (B, 1, H, W) mask, drawing its noise from the seed as make_noise does."""
    inpaint = FluxInpaintPipeline(scheduler=scheduler(), vae=None, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=pipe.transformer)
    with torch.no_grad():
        out = inpaint(prompt_embeds=txt, pooled_prompt_embeds=vec, image=image, mask_image=mask.clone(),
                      masked_image_latents=image, width=width, height=height, strength=strength,
                      num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=num_images,
                      generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images  # packed (B, L, 64), model space


@pytest.mark.parametrize("width,height,steps,strength,num_images,mask_size", [
    (64, 96, 10, 0.85, 1, (96, 64)),  # a box mask at the image's size
    (96, 64, 6, 1.0, 2, (64, 96)),  # strength 1 (from pure noise), one mask for two images
    (64, 96, 8, 0.6, 2, (100, 70)),  # a soft mask of another size (it rounds to the image's, as Encode Image)
])
def test_inpainting_matches_flux_inpaint_pipeline(models, width, height, steps, strength, num_images, mask_size):
    ours, pipe = models
    txt, vec = conditioning(1, seed=6)
    gen = torch.Generator().manual_seed(7)
    raw_image = torch.randn(1, 16, height // 8, width // 8, generator=gen)
    mask = torch.zeros(1, *mask_size)
    mask[:, mask_size[0] // 4: mask_size[0] * 3 // 4, mask_size[1] // 3:] = 1.0
    if mask_size != (height, width):
        mask = mask * torch.rand(mask.shape, generator=gen)  # soft values: both sides of the 0.5 threshold
    settings = GenerationSettings(width=width, height=height, num_steps=steps, guidance=4.5, seed=9,
                                  num_images=num_images, strength=strength)
    raw = generate(ours, txt, vec, settings, torch.device("cpu"), torch.float32, init_latent=raw_image,
                   mask=mask).latents
    image = to_model_space(raw_image)
    reference = run_diffusers_inpaint(pipe, txt, vec, image, mask[:, None], width, height, steps, 4.5, strength,
                                      9, num_images)
    assert rel_err(pack(to_model_space(raw)), reference) < 1e-4
    # Sanity of the oracle itself: it kept some of the image and repainted the rest.
    kept = (reference - pack(image.expand(num_images, -1, -1, -1))).abs().amax(dim=-1) < 1e-5
    assert 0 < kept.float().mean() < 1
