"""The sampling schedule and latent conventions against their formulas and diffusers' scheduler: the shifted
schedule, the image-to-image start (strength in (0, 1], one input image noised with each image's own noise),
ComfyUI's noise (float32 on the CPU whatever torch's defaults are), FLUX's packing."""
import math

import numpy as np
import pytest
import torch

from comfyui_krea.sampling.denoise import GenerationSettings, prepare
from comfyui_krea.sampling.latents import image_ids, make_noise, pack, unpack
from comfyui_krea.sampling.schedule import get_schedule, image_to_image_start, shift_mu


@pytest.mark.parametrize("steps", [1, 4, 20, 28, 50])
@pytest.mark.parametrize("size", [(512, 512), (1024, 768), (1024, 1024), (576, 1024), (2048, 2048)])
def test_schedule_matches_formula(steps, size):
    w, h = size
    seq_len = (h // 16) * (w // 16)
    mu = 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)
    expected = [1.0]
    for i in range(1, steps + 1):
        t = 1 - i / steps
        expected.append(0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
    got = get_schedule(steps, seq_len)
    assert len(got) == steps + 1 and got[0] == 1.0 and got[-1] == 0.0
    assert np.allclose(got, expected, rtol=0, atol=1e-12)
    assert all(a > b for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("steps", [4, 28, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 3072, 4096])
def test_schedule_matches_diffusers_scheduler(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(seq_len))
    assert np.allclose(scheduler.sigmas.numpy(), get_schedule(steps, seq_len), atol=1e-6)


def test_mu_end_points():
    assert shift_mu(256) == pytest.approx(0.5)
    assert shift_mu(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("steps,strength,expected_run", [(40, 0.95, 38), (28, 1.0, 28), (10, 0.5, 5), (1, 0.01, 1),
                                                         (28, 0.95, 27), (50, 0.01, 1)])
def test_image_to_image_start_as_diffusers(steps, strength, expected_run):
    # diffusers FluxImg2ImgPipeline.get_timesteps: t_start = int(steps - steps * strength)
    assert steps - image_to_image_start(steps, strength) == expected_run


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.0001, 1.5, 2.0])
def test_image_to_image_strength_outside_zero_one_is_refused(strength):
    with pytest.raises(ValueError, match="strength"):
        image_to_image_start(28, strength)


def test_image_to_image_batch_from_one_image_noises_it_with_each_images_own_noise():
    width, height, steps, strength, seed = 48, 32, 10, 0.5, 7
    lh, lw = height // 8, width // 8
    image_latent = torch.randn(1, 16, lh, lw, generator=torch.Generator().manual_seed(1))
    settings = GenerationSettings(width=width, height=height, num_steps=steps, guidance=4.5, seed=seed,
                                  num_images=3, strength=strength)
    start, timesteps = prepare(settings, image_latent)
    # of a 10-step schedule the last int(10 * 0.5) = 5 steps run, from t0 * noise + (1 - t0) * image_latent
    full = get_schedule(steps, (lh // 2) * (lw // 2))
    assert timesteps == full[5:]
    t0 = full[5]
    noise = torch.randn((3, 16, lh, lw), generator=torch.manual_seed(seed), dtype=torch.float32)
    model_space = (image_latent - 0.1159) * 0.3611
    expected = t0 * noise + (1 - t0) * model_space
    assert start.shape == (3, (lh // 2) * (lw // 2), 64)
    torch.testing.assert_close(start, pack(expected))


def test_noise_is_comfyui_convention_and_batch_prefix_stable():
    noise = make_noise(42, 3, 12, 16)
    assert noise.shape == (3, 16, 12, 16) and noise.dtype == torch.float32
    assert torch.equal(noise, torch.randn((3, 16, 12, 16), generator=torch.manual_seed(42)))
    assert torch.equal(make_noise(42, 1, 12, 16)[0], noise[0])
    assert not torch.equal(make_noise(43, 1, 12, 16)[0], noise[0])
    make_noise(2**64 - 1, 1, 2, 2)  # the largest seed the node accepts


def test_seeds_a_multiple_of_2_to_the_32_apart_give_the_same_noise():
    """What README.md says about seeds: torch's CPU generator (which draws the noise on every device, as ComfyUI's
    KSampler does) keeps only a seed's lower 32 bits. If a torch release changes that, the README must too."""
    for seed in (0, 5, 2**32 - 1):
        assert torch.equal(make_noise(seed + 2**32, 1, 2, 2), make_noise(seed, 1, 2, 2))
    assert torch.equal(make_noise(2**64 - 1, 1, 2, 2), make_noise(2**32 - 1, 1, 2, 2))
    assert not torch.equal(make_noise(2**32, 1, 2, 2), make_noise(1, 1, 2, 2))


def test_noise_is_float32_cpu_even_under_other_torch_defaults():
    expected = torch.randn((2, 16, 3, 5), generator=torch.manual_seed(11), dtype=torch.float32, device="cpu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # another custom node may have changed the defaults
    try:
        with torch.device("meta"):
            noise = make_noise(11, 2, 3, 5)
    finally:
        torch.set_default_dtype(previous)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected)


def test_pack_layout_matches_diffusers_and_roundtrips():
    from diffusers import FluxPipeline

    latent = torch.randn(2, 16, 6, 10)
    ours = pack(latent)
    theirs = FluxPipeline._pack_latents(latent, 2, 16, 6, 10)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack(ours, 6, 10), latent)
    ids = image_ids(2, 6, 10)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(ids[0], ref_ids)
