"""The VAE's memory plan and tiles: the bytes a pass needs (per device, batch size and precision), the plan a memory
budget leads to (whole batch, batch chunks, then tiles in image pixels and their overlap), and tiles and chunks run,
blended and reported as planned, on the input's device in float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig, tiling
from conftest import TINY_AUTOENCODER

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# ------------------------------------------------------------------------------------ the memory a pass needs

def test_autoencoder_pass_bytes_grows_with_batch_size_and_precision():
    from comfyui_krea.model_loader.autoencoder import AutoEncoder

    with torch.device("meta"):
        vae = AutoEncoder(TINY_AUTOENCODER)
    cpu = torch.device("cpu")
    one = vae.pass_bytes("decode", 1, 16, 16, cpu)
    assert isinstance(one, int) and one > 16 * 16 * 64 * 4  # at least one float32 feature map of the top level
    assert vae.pass_bytes("decode", 3, 16, 16, cpu) == 3 * one
    assert vae.pass_bytes("decode", 1, 16, 32, cpu) > one and vae.pass_bytes("decode", 1, 32, 16, cpu) > one
    assert vae.pass_bytes("encode", 1, 16, 16, cpu) != one
    assert vae.to(torch.bfloat16).pass_bytes("decode", 1, 16, 16, cpu) < one
    assert vae.pass_bytes("decode", 1, 16, 16, torch.device("cuda")) > 0  # asks no CUDA runtime


def test_the_estimate_adds_each_devices_measured_overhead_to_the_activations():
    elements = tiling.activation_elements(TINY_AUTOENCODER, "decode", 12, 16)
    assert tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 12, 16, torch.float32, CPU) == int(
        elements * 4 * tiling._CPU_OVERHEAD)
    assert tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 12, 16, torch.bfloat16, CUDA) == int(
        elements * 2 * tiling._CUDA_OVERHEAD)
    assert tiling._CUDA_OVERHEAD != tiling._CPU_OVERHEAD


# --------------------------------------------------------------------------------------------------- the plan

def _plan(*args, config=TINY_AUTOENCODER, **kwargs):
    plan = tiling.plan(config, "decode", *args, **kwargs)
    assert all(type(v) is int for v in (plan.batch_chunk, plan.overlap)), plan  # never float pixels
    assert plan.tile is None or type(plan.tile) is int, plan
    return (plan.batch_chunk, plan.tile, plan.overlap)


def test_explicit_tiles_in_image_pixels_become_latent_pixels():
    assert _plan(2, 40, 40, torch.float32, CPU, tile_size=256) == (2, 32, 8)  # overlap: a quarter of the tile
    assert _plan(2, 40, 40, torch.float32, CPU, tile_size=256, tile_overlap=32) == (2, 32, 4)
    assert _plan(2, 40, 40, torch.float32, CPU, tile_size=256, tile_overlap=0) == (2, 32, 0)
    assert _plan(2, 40, 40, torch.float32, CPU, tile_size=256, tile_overlap=248) == (2, 32, 31)
    one_level = AutoEncoderConfig(ch=32, ch_mult=(1,), z_channels=16)  # downscale factor 1: any side works
    assert _plan(1, 4, 4, torch.float32, CPU, tile_size=1, tile_overlap=0, config=one_level) == (1, 1, 0)


@pytest.mark.parametrize("tile_size,tile_overlap,message", [
    (0, None, "tile_size must"), (-8, 0, "tile_size must"), (12, 0, "tile_size must"),
    (256, -8, "tile_overlap must"), (256, 12, "tile_overlap must"), (256, 256, "tile_overlap must"),
    (256, 264, "tile_overlap must")])
def test_explicit_tiles_off_the_grid_are_refused(tile_size, tile_overlap, message):
    with pytest.raises(ValueError, match=message):
        _plan(1, 40, 40, torch.float32, CPU, tile_size=tile_size, tile_overlap=tile_overlap)


def test_a_budget_that_holds_the_estimate_exactly_is_enough():
    for dtype in (torch.float32, torch.bfloat16):
        whole = tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 40, 40, dtype, CPU)
        assert _plan(3, 40, 40, dtype, CPU, budget_bytes=3 * whole) == (3, None, 0)
        assert _plan(3, 40, 40, dtype, CPU, budget_bytes=3 * whole - 1) == (2, None, 0)
        assert _plan(3, 40, 40, dtype, CPU, budget_bytes=whole) == (1, None, 0)
        # The largest automatic tile that fits: 512 px (64 latent pixels) when its estimate is the budget.
        fits = tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 64, 64, dtype, CPU)
        assert _plan(1, 160, 160, dtype, CPU, budget_bytes=fits) == (1, 64, 8)
        assert _plan(1, 160, 160, dtype, CPU, budget_bytes=fits - 1) == (1, 48, 6)  # then 384 px


@pytest.mark.parametrize("levels,tile,overlap", [(4, 32, 4), (6, 8, 1), (7, 4, 1)])
def test_when_nothing_fits_the_smallest_tile_is_tried_with_an_eighth_of_it_shared(levels, tile, overlap):
    config = AutoEncoderConfig(ch=8, ch_mult=(1,) * levels, z_channels=16)  # downscale factor 2**(levels-1)
    assert _plan(1, 400, 400, torch.float32, CPU, budget_bytes=1, config=config) == (1, tile, overlap)


def test_the_budget_is_a_share_of_the_free_memory_per_device_type(monkeypatch):
    for device, share, other in ((CPU, tiling._CPU_BUDGET_SHARE, tiling._CUDA_BUDGET_SHARE),
                                 (CUDA, tiling._CUDA_BUDGET_SHARE, tiling._CPU_BUDGET_SHARE)):
        whole = tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 40, 40, torch.float32, device)
        free = int(whole / ((share + other) / 2))  # between the two shares
        monkeypatch.setattr(tiling, "available_memory", lambda d, free=free: free)
        expected = (1, None, 0) if share > other else (1, 32, 4)
        assert _plan(1, 40, 40, torch.float32, device) == expected, device


def test_a_bf16_vae_plans_with_its_own_element_size(tiny_vae, monkeypatch):
    import copy

    half = copy.deepcopy(tiny_vae).to(torch.bfloat16)
    # 40 latent pixels a side: more than the smallest automatic tile (32), so a wrong estimate means tiles.
    for kind, size in (("decode", (1, 16, 40, 40)), ("encode", (1, 3, 320, 320))):
        latent_side = 40
        need = tiling.estimate_bytes(TINY_AUTOENCODER, kind, latent_side, latent_side, torch.bfloat16, CPU)
        monkeypatch.setattr(tiling, "available_memory", lambda d, need=need: int(need / tiling._CPU_BUDGET_SHARE) + 8)
        calls: list[tuple[int, int]] = []
        run = half.decode if kind == "decode" else half.encode
        run(torch.zeros(size), callback=lambda *a, calls=calls: calls.append(a))
        assert calls == [(1, 1)], kind  # one untiled pass: the bf16 estimate (half the float32 one) fits


# -------------------------------------------------------------------------------- tiles and batch chunks, run

def test_tiles_and_batch_chunks_run_on_the_inputs_device_in_float32():
    x = torch.empty(2, 4, 20, 24, device="meta")  # another device than the CPU that builds the blend weights
    out = tiling.run(tiling.TilePlan(1, 8, 2), x, lambda t: F.interpolate(t, scale_factor=2.0), in_scale=1,
                     out_scale=2, out_channels=4)
    assert (out.device.type, out.dtype, out.shape) == ("meta", torch.float32, (2, 4, 40, 48))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = tiling.run(tiling.TilePlan(1, 8, 2), torch.randn(1, 4, 20, 24, dtype=torch.float32),
                         lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), in_scale=1, out_scale=2,
                         out_channels=4)
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("batch,chunk", [(4, 2), (5, 2), (3, 3)])
def test_batch_chunks_are_all_run_in_order_and_reported(batch, chunk):
    x = torch.randn(batch, 2, 6, 6)
    calls = []
    out = tiling.run(tiling.TilePlan(chunk, None, 0), x, lambda t: t * 2 + t.shape[0], in_scale=1, out_scale=1,
                     out_channels=2, callback=lambda done, total: calls.append((done, total)))
    parts = [x[i:i + chunk] * 2 + len(x[i:i + chunk]) for i in range(0, batch, chunk)]
    torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)
    count = len(parts)
    assert calls == [(i, count) for i in range(1, count + 1)]


@pytest.mark.parametrize("length,max_tile,overlap,scale", [(9, 4, 1, 1), (40, 12, 3, 1), (40, 12, 3, 8),
                                                           (23, 8, 1, 2), (16, 8, 0, 2)])
def test_the_blend_weights_of_neighbouring_tiles_add_up_to_one(length, max_tile, overlap, scale):
    tile, starts = tiling.axis_tiles(length, max_tile, overlap)
    assert len(starts) >= 3 or overlap == 0
    total = torch.zeros(length * scale)
    for i, start in enumerate(starts):
        ramp = tiling._ramp(starts, i, tile, scale)
        assert ramp.dtype == torch.float32 and float(ramp.min()) > 0
        total[start * scale:(start + tile) * scale] += ramp
    torch.testing.assert_close(total, torch.ones_like(total))


def test_forced_encode_tiles_report_progress(tiny_vae):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    calls = []
    tiled = tiny_vae.encode(images, tile_size=32, tile_overlap=16, callback=lambda *a: calls.append(a))
    assert len(calls) >= 4  # at least a 2 x 2 grid of tiles
    assert not torch.equal(tiled, tiny_vae.encode(images))  # tiles see only part of the image


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_an_explicit_tile_overlap_is_used(tiny_vae, kind):
    # 15 latent pixels in tiles of 8: an overlap of 1 needs 2 tiles a side, the default (2) would need 3.
    calls = []
    if kind == "decode":
        tiny_vae.decode(torch.zeros(1, 16, 15, 15), tile_size=64, tile_overlap=8, callback=lambda *a: calls.append(a))
    else:
        tiny_vae.encode(torch.zeros(1, 3, 120, 120), tile_size=64, tile_overlap=8, callback=lambda *a: calls.append(a))
    assert calls[-1] == (4, 4)
