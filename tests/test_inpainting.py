"""Inpainting in the sampler: the mask rule (sizes, threshold, nearest-neighbour grid, batches), the known region
kept exactly with and without step caching and in the previews, the Krea Sampler's mask input and a latent's
noise_mask (which wins, refusals before the model loads), and the mask loaders of the server-less runner.
Parity with diffusers' FluxInpaintPipeline is in test_pipeline_parity.py."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from PIL import Image

from comfyui_krea.image_io.load import channel_mask, image_and_mask, image_size
from comfyui_krea.model_loader.flux import load_flux, write_random_flux_checkpoint
from comfyui_krea.nodes.host import TransformerHandle, forget_loaded
from comfyui_krea.nodes.sampler import KreaSampler
from comfyui_krea.sampling.denoise import GenerationSettings, generate
from comfyui_krea.sampling.inpaint import as_mask_batch, latent_mask, mask_size_problem
from comfyui_krea.sampling.latents import to_model_space, unpack
from conftest import TINY_FLUX

CPU = torch.device("cpu")
W, H = 64, 48  # latent 8 x 6


def cond(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 7, TINY_FLUX.context_in_dim, generator=gen), torch.randn(1, TINY_FLUX.vec_in_dim,
                                                                                   generator=gen)


def image_latent(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def right_half(height: int = H, width: int = W) -> torch.Tensor:
    mask = torch.zeros(1, height, width)
    mask[..., width // 2:] = 1.0
    return mask


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_flux(write_random_flux_checkpoint(tmp_path_factory.mktemp("inpaint") / "f.safetensors", TINY_FLUX,
                                                  seed=2))


# ------------------------------------------------------------------------------------------------ the mask rule

def test_the_latent_grid_takes_the_top_left_pixel_of_each_block_at_the_threshold():
    mask = torch.zeros(1, H, W)
    mask[0, 8, 16] = 0.5  # top-left pixel of latent cell (1, 2), exactly at the threshold: repaint
    mask[0, 17, 32] = 1.0  # inside cell (2, 4) but not its top-left pixel: not seen
    mask[0, 24, 40] = 0.49  # top-left of cell (3, 5), below the threshold: keep
    grid = latent_mask(mask, H // 8, W // 8, 2)
    assert grid.shape == (2, 1, H // 8, W // 8)
    assert grid[0, 0].nonzero().tolist() == [[1, 2]] and torch.equal(grid[0], grid[1])


@pytest.mark.parametrize("mask_size,ok", [((48, 64), True), ((50, 60), True), ((40, 64), True), ((56, 64), False),
                                          ((6, 8), False), ((48, 80), False)])
def test_a_mask_fits_when_it_rounds_to_the_image_size(mask_size, ok):
    problem = mask_size_problem(*mask_size, H, W)
    assert (problem is None) == ok
    if not ok:
        assert f"the mask is {mask_size[1]}x{mask_size[0]} but the image is sampled at {W}x{H}" in problem


def test_the_empty_mask_of_an_opaque_load_image_is_explained():
    problem = mask_size_problem(64, 64, 96, 128)
    assert "empty mask Load Image gives for an image without transparency" in problem and "mask editor" in problem


@pytest.mark.parametrize("mask,message", [
    (torch.zeros(1, 2, 48, 64), "a MASK is (batch, height, width)"),
    (torch.zeros(48, 64, dtype=torch.uint8), "must be a MASK"),
    ("mask.png", "must be a MASK"),
    (torch.full((48, 64), float("nan")), "NaN or infinite"),
])
def test_bad_masks_are_refused(mask, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        as_mask_batch(mask)


def test_mask_shapes_of_comfyui():
    assert as_mask_batch(torch.zeros(48, 64)).shape == (1, 48, 64)  # one mask
    assert as_mask_batch(torch.zeros(2, 48, 64)).shape == (2, 48, 64)  # MASK
    assert as_mask_batch(torch.zeros(2, 1, 48, 64)).shape == (2, 48, 64)  # SetLatentNoiseMask's noise_mask


# ------------------------------------------------------------------------------------------- the known region

def known_cells(mask: torch.Tensor) -> torch.Tensor:
    return latent_mask(as_mask_batch(mask), H // 8, W // 8, 1)[0, 0] == 0  # (6, 8) True where kept


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_the_known_region_is_the_image_latent_with_and_without_step_caching(model, threshold):
    txt, vec = cond()
    settings = GenerationSettings(width=W, height=H, num_steps=12, guidance=4.5, seed=1, num_images=1,
                                  strength=0.9)
    result = generate(model, txt, vec, settings, CPU, torch.float32, init_latent=image_latent(),
                      cache_threshold=threshold, mask=right_half())
    kept = known_cells(right_half())
    diff = (result.latents - image_latent()).abs().amax(dim=1)[0]  # (6, 8)
    assert diff[kept].max() < 1e-5 and diff[~kept].min() > 1e-2
    assert result.repainted == 0.5
    if threshold:
        assert result.cache.reused_steps > 0  # the cache served steps of this inpainting run


def test_one_mask_for_several_images_keeps_the_region_in_each(model):
    txt, vec = cond()
    settings = GenerationSettings(width=W, height=H, num_steps=4, guidance=4.5, seed=5, num_images=3, strength=1.0)
    latents = generate(model, txt, vec, settings, CPU, torch.float32, init_latent=image_latent(),
                       mask=right_half()).latents
    kept = known_cells(right_half())
    for image in latents:
        assert (image - image_latent()[0]).abs().amax(dim=0)[kept].max() < 1e-5
    assert (latents[0] - latents[1]).abs().amax(dim=0)[~kept].min() > 1e-3  # each image has its own noise


def test_the_previews_show_the_kept_region(model):
    txt, vec = cond()
    seen = []
    settings = GenerationSettings(width=W, height=H, num_steps=4, guidance=4.5, seed=5, num_images=1, strength=0.8)
    generate(model, txt, vec, settings, CPU, torch.float32, init_latent=image_latent(), mask=right_half(),
             callback=lambda step, total, x0: seen.append(x0))
    kept = known_cells(right_half())
    assert len(seen) == 4  # strength 0.8 of 4 steps: int(4 - 3.2) = 0 skipped
    for x0 in seen:  # model space, like the state
        assert (x0 - to_model_space(image_latent())).abs().amax(dim=1)[0][kept].max() < 1e-5


def test_a_mask_needs_an_image_latent(model):
    txt, vec = cond()
    settings = GenerationSettings(width=W, height=H, num_steps=2, guidance=4.5, seed=5, num_images=1)
    with pytest.raises(ValueError, match="inpainting needs the image"):
        generate(model, txt, vec, settings, CPU, torch.float32, mask=right_half())


def test_unpack_is_the_layout_the_mask_grid_uses():
    # The packed mask lines up with the packed state: a cell kept in the grid is kept in every channel.
    from comfyui_krea.sampling.inpaint import KnownRegion

    region = KnownRegion.build(right_half(), torch.zeros(1, 16, 6, 8), torch.zeros(1, 16, 6, 8))
    grid = unpack(region.repaint, 6, 8)
    assert torch.equal(grid, latent_mask(right_half(), 6, 8, 1).expand(-1, 16, -1, -1))


# ------------------------------------------------------------------------------------------------- the node

class NeverLoaded:
    """A model handle that fails the test if anything tries to load the model."""
    device = CPU

    def load(self):
        raise AssertionError("the model was loaded although the input was invalid")


BASE = dict(image_size="custom", width=W, height=H, num_inference_steps=3, guidance_scale=4.5, seed=7,
            num_images=1, acceleration="none")


@pytest.fixture(scope="module")
def handle(tmp_path_factory) -> TransformerHandle:
    path = write_random_flux_checkpoint(tmp_path_factory.mktemp("node") / "f.safetensors", TINY_FLUX, seed=2)
    yield TransformerHandle(path, "default", CPU)
    forget_loaded()


def node_cond():
    txt, vec = cond()
    return [[txt, {"pooled_output": vec}]]


def test_a_noise_mask_inpaints_as_the_mask_input_and_the_mask_input_wins(handle, caplog):
    left = 1.0 - right_half()
    run = KreaSampler().sample
    by_input = run(handle, node_cond(), **BASE, latent={"samples": image_latent()}, mask=right_half())
    by_noise_mask = run(handle, node_cond(), **BASE,
                        latent={"samples": image_latent(), "noise_mask": right_half()[:, None]})
    assert torch.equal(by_input["result"][0]["samples"], by_noise_mask["result"][0]["samples"])
    assert "inpainting: 50% of the image repainted" in by_input["ui"]["text"][0]
    with caplog.at_level(logging.INFO):
        both = run(handle, node_cond(), **BASE, latent={"samples": image_latent(), "noise_mask": left[:, None]},
                   mask=right_half())
    assert torch.equal(both["result"][0]["samples"], by_input["result"][0]["samples"])
    assert "the mask input is used; the latent's noise mask" in caplog.text
    plain = run(handle, node_cond(), **BASE, latent={"samples": image_latent()})
    assert not torch.equal(plain["result"][0]["samples"], by_input["result"][0]["samples"])


def test_an_empty_mask_gives_the_image_back_and_says_so(handle):
    out = KreaSampler().sample(handle, node_cond(), **BASE, latent={"samples": image_latent()},
                               mask=torch.zeros(1, H, W))
    assert (out["result"][0]["samples"] - image_latent()).abs().max() < 1e-5
    assert "the mask is empty: the image is kept as it is" in out["ui"]["text"][0]


@pytest.mark.parametrize("inputs,message", [
    ({"mask": right_half(96, 128)}, "mask: the mask is 128x96 but the image is sampled at 64x48"),
    ({"mask": torch.zeros(1, 64, 64)}, "empty mask Load Image gives"),
    ({"mask": right_half().expand(2, -1, -1)}, "the mask holds 2 masks but num_images is 1"),
    ({"latent": {"samples": image_latent(), "noise_mask": torch.zeros(1, 1, 6, 8)}},
     "the latent's noise_mask: the mask is 8x6"),
    ({"latent": None, "mask": right_half()}, "mask needs the image to inpaint"),
])
def test_wrong_masks_are_refused_before_the_model_loads(inputs, message):
    arguments = {"latent": {"samples": image_latent()}, **inputs}
    with pytest.raises(ValueError, match=re.escape(message)):
        KreaSampler().sample(NeverLoaded(), node_cond(), **BASE, **arguments)


# -------------------------------------------------------------------------------------------- the mask loaders

def test_load_image_mask_reads_a_channel_as_comfyui_does(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (255, 0, 51, 255))
    rgba.putpixel((0, 0), (0, 255, 0, 0))
    red, green, alpha = (channel_mask(rgba, c) for c in ("red", "green", "alpha"))
    assert red.shape == (1, 2, 4) and red[0, 0, 0] == 0 and red[0, 1, 1] == 1  # white-ish = repaint
    assert green[0, 0, 0] == 1 and green[0, 1, 1] == 0
    assert alpha[0, 0, 0] == 1 and alpha[0, 1, 1] == 0  # transparent = repaint
    assert torch.allclose(channel_mask(rgba, "blue")[0, 1, 1], torch.tensor(0.2))
    assert channel_mask(Image.new("L", (3, 3), 255), "red").min() == 1  # grayscale masks: any colour channel
    with pytest.raises(ValueError, match="channel must be one of alpha, red, green, blue"):
        channel_mask(rgba, "luma")


def test_load_image_gives_comfyuis_empty_mask_for_an_opaque_image():
    _, mask = image_and_mask(Image.new("RGB", (100, 50)))
    assert mask.shape == (1, 64, 64) and mask.max() == 0
    _, mask = image_and_mask(Image.new("RGBA", (100, 50), (0, 0, 0, 0)))
    assert mask.shape == (1, 50, 100) and mask.min() == 1


def test_image_size_reads_the_upright_size_from_the_header(tmp_path):
    image = Image.new("RGB", (30, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # a quarter turn: the loaders turn it upright, 20 wide and 30 high
    image.save(tmp_path / "turned.jpg", exif=exif)
    image.save(tmp_path / "plain.png")
    assert image_size(tmp_path / "turned.jpg") == (20, 30) and image_size(tmp_path / "plain.png") == (30, 20)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert image_size(tmp_path / "broken.png") is None
