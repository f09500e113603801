"""The FLUX autoencoder: parity with diffusers' AutoencoderKL, both key layouts, tiling, the memory estimate, what
encode and decode take and return (float32 out of a bf16 VAE), its compute dtype, file errors."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from activation_memory import module_peaks
from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.autoencoder import (
    FLUX_AUTOENCODER,
    AutoEncoder,
    AutoEncoderConfig,
    load_autoencoder,
    tiling,
    write_random_autoencoder_checkpoint,
)
from conftest import TINY_AUTOENCODER, rel_err

# mean |tiled - untiled| / std(untiled) with random weights (measured: decode 0.13, encode 0.07). Not zero:
# group norms and the mid attention see one tile, not the whole image. Geometry is tested exactly below.
TILED_TOLERANCE = 0.2


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory):
    return write_random_autoencoder_checkpoint(tmp_path_factory.mktemp("vae") / "ae.safetensors", TINY_AUTOENCODER,
                                               seed=3)


@pytest.fixture(scope="module")
def model(bfl_file):
    return load_autoencoder(bfl_file, "cpu")


@pytest.fixture(scope="module")
def diffusers_reference(tmp_path_factory):
    from diffusers import AutoencoderKL

    folder = write_random_autoencoder_checkpoint(tmp_path_factory.mktemp("diffusers") / "vae", TINY_AUTOENCODER, seed=3,
                                                 layout="diffusers")
    reference = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=16, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    )
    reference.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")), strict=True)
    return folder, reference.eval()


def test_config_is_read_off_the_shapes(model):
    assert model.config == TINY_AUTOENCODER
    assert model.config.downscale_factor == 8
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert not any(p.requires_grad for p in model.parameters())
    assert FLUX_AUTOENCODER.level_channels == (128, 256, 512, 512)


def test_encode_and_decode_match_diffusers(model, diffusers_reference):
    _, reference = diffusers_reference
    torch.manual_seed(0)
    images = torch.rand(2, 3, 48, 64) * 2 - 1  # not square: catches a swapped height and width
    with torch.no_grad():
        expected_latents = reference.encode(images).latent_dist.mean
        latents = model.encode(images)
        assert latents.shape == (2, 16, 6, 8)
        assert rel_err(latents, expected_latents) < 1e-4

        z = torch.randn(2, 16, 6, 8)
        expected_images = reference.decode(z).sample
        decoded = model.decode(z)
        assert decoded.shape == (2, 3, 48, 64)
        assert rel_err(decoded, expected_images) < 1e-4


def test_both_layouts_load_to_identical_outputs(model, diffusers_reference, tmp_path):
    folder, _ = diffusers_reference
    single_file = write_random_autoencoder_checkpoint(tmp_path / "vae.safetensors", TINY_AUTOENCODER, seed=3,
                                                      layout="diffusers")
    torch.manual_seed(1)
    images = torch.rand(1, 3, 32, 40) * 2 - 1
    z = torch.randn(1, 16, 4, 5)
    for source in (folder, folder.parent, single_file):  # vae/ folder, model folder holding vae/, one file
        other = load_autoencoder(source, "cpu")
        assert other.config == TINY_AUTOENCODER
        assert torch.equal(other.encode(images), model.encode(images))
        assert torch.equal(other.decode(z), model.decode(z))


def test_key_names_agree_with_diffusers_converter(bfl_file, diffusers_reference):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    folder, _ = diffusers_reference
    ours = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    theirs = convert_ldm_vae_checkpoint(load_file(str(bfl_file)), {
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4})
    assert set(theirs) == set(ours)
    for key, tensor in theirs.items():
        assert torch.equal(tensor, ours[key]), key


def test_old_diffusers_attention_names_load(model, diffusers_reference, tmp_path):
    folder, _ = diffusers_reference
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    renamed = {}
    for key, tensor in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = tensor
    save_file(renamed, str(tmp_path / "old.safetensors"))
    z = torch.randn(1, 16, 4, 4)
    assert torch.equal(load_autoencoder(tmp_path / "old.safetensors", "cpu").decode(z), model.decode(z))


def test_vae_inside_a_full_checkpoint_and_bf16_weights(model, bfl_file, tmp_path):
    state = {f"vae.{k}": v.to(torch.bfloat16) for k, v in load_file(str(bfl_file)).items()}
    state["model.diffusion_model.img_in.weight"] = torch.zeros(8, 4)
    save_file(state, str(tmp_path / "all_in_one.safetensors"))
    loaded = load_autoencoder(tmp_path / "all_in_one.safetensors", "cpu")
    assert loaded.dtype == torch.float32  # computes in float32 on CPU whatever the stored dtype
    z = torch.randn(1, 16, 4, 4)
    # bf16 weights: close to the float32 model, not equal
    assert 0 < rel_err(loaded.decode(z), model.decode(z)) < 0.05


def test_local_function_blends_exactly():
    """The tile geometry and ramps alone: an operation without context gives the untiled result exactly."""
    z = torch.randn(2, 16, 37, 50)

    def upsample(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t[:, :3], scale_factor=8, mode="nearest") * 2.0

    expected = upsample(z)
    for tile, overlap in ((8, 2), (16, 4), (12, 0), (64, 8)):
        plan = tiling.TilePlan(batch_chunk=1, tile=tile, overlap=overlap)
        out = tiling.run(plan, z, upsample, in_scale=1, out_scale=8, out_channels=3)
        assert torch.allclose(out, expected, atol=1e-5), (tile, overlap)


def test_overlaps_fade_between_tiles():
    """Each tile gets its own offset (a stand-in for a tile's colour drift): the ramps spread the step
    between two tiles across the overlap instead of leaving an edge."""
    z = torch.zeros(1, 16, 8, 20)
    offsets = iter(range(100))

    def drifting(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t[:, :1], scale_factor=8, mode="nearest") + float(next(offsets))

    out = tiling.run(tiling.TilePlan(1, 12, 4), z, drifting, in_scale=1, out_scale=8, out_channels=1)
    row = out[0, 0, 0]
    assert row[0] == 0 and row[-1] == 1  # two tiles: offsets 0 and 1
    steps = row[1:] - row[:-1]
    assert (steps >= 0).all() and steps.max() <= 1.01 / (4 * 8)  # a linear ramp over the 32 px overlap


def test_tiles_cover_with_the_requested_overlap():
    for length, max_tile, overlap in ((256, 128, 16), (100, 40, 10), (41, 40, 5), (96, 96, 8), (7, 4, 1)):
        tile, starts = tiling.axis_tiles(length, max_tile, overlap)
        assert tile <= max_tile and starts[0] == 0 and starts[-1] + tile == length
        for a, b in zip(starts, starts[1:]):
            assert a + tile - b >= overlap
    assert tiling.axis_tiles(256, 128, 16) == (96, [0, 80, 160])  # shrunk from 128: no wasted overlap


def test_tiled_decode_is_close_to_untiled(model):
    torch.manual_seed(2)
    z = torch.randn(1, 16, 32, 32)
    whole = model.decode(z)
    # A tile as large as the image is the untiled pass, exactly.
    assert torch.equal(model.decode(z, tile_size=256), whole)
    calls = []
    tiled = model.decode(z, tile_size=160, tile_overlap=48, callback=lambda done, total: calls.append(total))
    assert calls and calls[-1] == 4
    error = (tiled - whole).abs().mean() / whole.std()
    assert error < TILED_TOLERANCE
    assert tiled.shape == whole.shape


def test_tiled_encode_is_close_to_untiled(model):
    torch.manual_seed(4)
    images = torch.rand(1, 3, 256, 192) * 2 - 1
    whole = model.encode(images)
    tiled = model.encode(images, tile_size=160, tile_overlap=48)
    assert tiled.shape == whole.shape == (1, 16, 32, 24)
    assert (tiled - whole).abs().mean() / whole.std() < TILED_TOLERANCE


def test_tiles_are_chosen_when_memory_is_short(model, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(tiling, "available_memory", lambda device: 1 << 40)
    assert tiling.plan(TINY_AUTOENCODER, "decode", 2, 40, 40, torch.float32, cpu) == tiling.TilePlan(2, None, 0)
    one = tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 40, 40, torch.float32, cpu)
    assert tiling.plan(TINY_AUTOENCODER, "decode", 2, 40, 40, torch.float32, cpu,
                       budget_bytes=one + 1) == tiling.TilePlan(1, None, 0)  # one image at a time
    # Room for a 256 px tile (32 latent pixels) but not for the 320 px image.
    tile_bytes = tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 32, 32, torch.float32, cpu)
    monkeypatch.setattr(tiling, "available_memory", lambda device: tile_bytes * 10 // 7 + 10)
    calls = []
    out = model.decode(torch.randn(2, 16, 40, 40), callback=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (8, 8)  # 2 images x 2x2 tiles
    assert out.shape == (2, 3, 320, 320)


# Shapes whose every stage differs: widths that rise and fall (a shortcut conv in each level's first block),
# unequal channel counts in and out, one or two blocks per level, with and without the mid attention.
MEMORY_SHAPES = [
    AutoEncoderConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, norm_groups=8),
    AutoEncoderConfig(in_channels=4, out_channels=5, ch=16, ch_mult=(1, 3, 2), num_res_blocks=1, z_channels=8,
                      mid_attention=False, norm_groups=8),
]


@pytest.mark.parametrize("config", MEMORY_SHAPES, ids=["attention", "no-attention"])
@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_memory_estimate_matches_the_measured_activations_stage_by_stage(config, kind):
    # The planner's estimate against an independent measure: the bytes of every tensor the real modules
    # create, alive from creation to last reference (tests/activation_memory.py), at the peak of each stage.
    torch.manual_seed(0)
    net = AutoEncoder(config).eval()
    h, w = 12, 16  # latent pixels; not square, so rows and columns are not interchangeable
    f = config.downscale_factor
    if kind == "decode":
        measured, total = module_peaks(net.decoder, torch.randn(1, config.z_channels, h, w))
    else:
        measured, total = module_peaks(net.encoder, torch.randn(1, config.in_channels, h * f, w * f))
    elements = tiling.stage_elements(config, kind, h, w)
    assert all(type(n) is int for n in elements.values())
    estimated = {name: 4 * n for name, n in elements.items()}  # float32
    # Every stage that ran is estimated: the blocks, resamplers, mid blocks and the convs and norms around them.
    stage = re.compile(r"(conv_in|norm_out|conv_out|mid\.(block_1|attn_1|block_2)|(up|down)\.\d+\.block\.\d+"
                       r"|up\.\d+\.upsample|down\.\d+\.downsample)")
    assert set(estimated) == {name for name in measured if stage.fullmatch(name)}
    for name, estimate in estimated.items():
        # Off only by tensors of a few elements (the group norms' statistics).
        assert estimate == pytest.approx(measured[name], rel=0.003), name
    assert 4 * tiling.activation_elements(config, kind, h, w) == pytest.approx(total, rel=0.003)


def test_memory_estimate_scales_with_pixels_and_fits_2048_on_24gb():
    small = tiling.activation_elements(FLUX_AUTOENCODER, "decode", 64, 64)
    assert tiling.activation_elements(FLUX_AUTOENCODER, "decode", 128, 128) == 4 * small
    cpu = torch.device("cpu")
    budget = int(24e9 * 0.7)
    plan = tiling.plan(FLUX_AUTOENCODER, "decode", 1, 256, 256, torch.float32, cpu, budget_bytes=budget)
    side = plan.tile or 256
    assert tiling.estimate_bytes(FLUX_AUTOENCODER, "decode", side, side, torch.float32, cpu) <= budget
    plan = tiling.plan(FLUX_AUTOENCODER, "decode", 1, 256, 256, torch.float32, cpu, budget_bytes=4 << 30)
    assert plan.tile is not None and plan.tile * 8 <= 1024


def test_encode_rejects_sizes_off_the_grid(model):
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="tile_size"):
        model.decode(torch.zeros(1, 16, 4, 4), tile_size=20)


# --------------------------------------------------------------------- what encode and decode take and return

@pytest.mark.parametrize("shape", [(1, 3, 0, 16), (1, 3, 16, 0), (1, 4, 16, 16), (3, 16, 16)])
def test_encode_refuses_empty_or_misshaped_images(tiny_vae, shape):
    with pytest.raises(ValueError, match="encode expects images|multiples of 8"):
        tiny_vae.encode(torch.zeros(shape))


def test_decode_refuses_latents_of_another_channel_count(tiny_vae):
    with pytest.raises(ValueError, match="decode expects latents of shape"):
        tiny_vae.decode(torch.zeros(1, TINY_AUTOENCODER.z_channels + 1, 4, 4))


def test_encode_of_a_bf16_vae_takes_float32_images_and_returns_float32(tiny_vae):
    import copy

    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    half = copy.deepcopy(tiny_vae).to(torch.bfloat16)
    out = half.encode(images)
    assert out.dtype == torch.float32 and out.shape == (1, 16, 2, 2)
    assert rel_err(out, tiny_vae.encode(images)) < 0.05


def test_untiled_decode_of_a_bf16_vae_returns_float32(tiny_vae):
    import copy

    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    out = copy.deepcopy(tiny_vae).to(torch.bfloat16).decode(latents)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 32, 32)
    assert rel_err(out, tiny_vae.decode(latents)) < 0.05


@pytest.mark.parametrize("available,bf16,device,expected", [
    (True, True, "cuda", torch.bfloat16), (True, False, "cuda", torch.float32), (False, True, "cuda", torch.float32),
    (True, True, "cpu", torch.float32), (True, True, "mps", torch.float32)])
def test_autoencoder_computes_in_bf16_only_on_gpus_that_have_it(monkeypatch, available, bf16, device, expected):
    from comfyui_krea.model_loader.compute_dtypes import autoencoder_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert autoencoder_compute_dtype(torch.device(device)) is expected


def _save(tmp_path, name, state):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_files_of_other_models_are_named(tmp_path):
    cases = {
        "flux.safetensors": ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, "FLUX transformer"),
        "comfy.safetensors": ({"model.diffusion_model.single_blocks.0.linear1.weight": torch.zeros(2, 2)},
                              "FLUX transformer"),
        "clip.safetensors": ({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2)}, "CLIP"),
        "t5.safetensors": ({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2),
                            "shared.weight": torch.zeros(4, 2)}, "T5"),
        "lora.safetensors": ({"lora_unet_double_blocks_0.lora_down.weight": torch.zeros(2, 2)}, "LoRA"),
        "other.safetensors": ({"foo.weight": torch.zeros(2)}, "no autoencoder"),
    }
    for name, (state, what) in cases.items():
        with pytest.raises(ModelFileError, match=what) as info:
            load_autoencoder(_save(tmp_path, name, state), "cpu")
        assert name in str(info.value) and "ae.safetensors" in str(info.value)


def test_sd_vae_is_called_a_vae_of_another_model(tmp_path):
    sd = AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    path = write_random_autoencoder_checkpoint(tmp_path / "sdxl_vae.safetensors", sd)
    state = load_file(str(path))
    state["quant_conv.weight"] = torch.zeros(8, 8, 1, 1)
    state["post_quant_conv.weight"] = torch.zeros(4, 4, 1, 1)
    with pytest.raises(ModelFileError, match="VAE of another model: 4 latent channels, not 16"):
        load_autoencoder(_save(tmp_path, "sdxl_vae.safetensors", state), "cpu")


def test_damaged_vae_files(bfl_file, tmp_path):
    state = load_file(str(bfl_file))
    missing = dict(state)
    del missing["decoder.up.1.block.0.conv2.weight"]
    with pytest.raises(ModelFileError, match="incomplete autoencoder.*decoder.up.1.block.0.conv2.weight"):
        load_autoencoder(_save(tmp_path, "missing.safetensors", missing), "cpu")
    reshaped = dict(state)
    reshaped["decoder.mid.block_1.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ModelFileError, match="has shape"):
        load_autoencoder(_save(tmp_path, "reshaped.safetensors", reshaped), "cpu")
    extra = dict(state)
    extra["decoder.up.0.block.7.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ModelFileError, match="does not know"):
        load_autoencoder(_save(tmp_path, "extra.safetensors", extra), "cpu")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bfl_file.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match="truncated"):
        load_autoencoder(truncated, "cpu")
