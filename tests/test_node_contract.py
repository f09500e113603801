"""The nodes' contract at their boundary, on small random-weight checkpoints written through the real loaders.

Pinned here:
- every KreaSampler input changes the result the way it must: seed, guidance_scale, num_inference_steps,
  image_size / width / height (latent shape (B, 16, H/8, W/8)), num_images (image 0 of a batch is the single
  image), strength (image-to-image: how many steps run, reported in the ui text) and acceleration (step reuse on a
  model whose steps change little);
- LATENT holds raw VAE latents in diffusers' convention, checked against an independent oracle: diffusers'
  AutoencoderKL on the same weights, with FLUX's VAE numbers (scaling_factor 0.3611, shift_factor 0.1159) typed
  here from FLUX.1-dev's vae/config.json, not imported from the pack (inside the pack the scaling and
  its inverse cancel, so only an outside oracle notices a wrong number);
- KreaDecode maps the decoder's [-1, 1] to IMAGE's [0, 1] exactly as (x + 1) / 2, clamped;
- the progress callback's x0 (the latent preview) is the flow-matching prediction of the clean latent:
  x_t = t * noise + (1 - t) * x0 and v = noise - x0, so x0 = x_t - t * v.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig, write_random_autoencoder_checkpoint
from comfyui_krea.model_loader.flux import FluxConfig, write_random_flux_checkpoint
from comfyui_krea.nodes.host import TransformerHandle, VaeHandle, forget_loaded, host
from comfyui_krea.nodes.image import KreaDecode, KreaEncodeImage
from comfyui_krea.nodes.sampler import KreaSampler
from comfyui_krea.sampling.denoise import GenerationSettings, denoise, generate
from conftest import rel_err

# FLUX.1's VAE latent convention (black-forest-labs/FLUX.1-dev vae/config.json). Typed, not imported.
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159

CPU = torch.device("cpu")
SMALL = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=32,
                   num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))
TINY_VAE = AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)

_gen = torch.Generator().manual_seed(0)
COND = [[torch.randn(1, 7, SMALL.context_in_dim, generator=_gen),
         {"pooled_output": torch.randn(1, SMALL.vec_in_dim, generator=_gen)}]]
# Small and not square (a swapped width and height shows); 3 steps.
BASE = {"image_size": "custom", "width": 64, "height": 48, "num_inference_steps": 3, "guidance_scale": 4.5,
        "seed": 7, "num_images": 1, "acceleration": "none"}


@pytest.fixture(autouse=True)
def standalone_state():
    """Tests set the progress reporter: the host's module-level state is put back afterwards."""
    saved = host.settings()
    yield
    host.restore(saved)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    yield tmp_path_factory.mktemp("node_contract")
    forget_loaded()  # the handles' model cache holds the models of this module's files


@pytest.fixture(scope="module")
def transformer(folder) -> TransformerHandle:
    return TransformerHandle(write_random_flux_checkpoint(folder / "flux.safetensors", SMALL, seed=5), "default", CPU)


@pytest.fixture(scope="module")
def slow_transformer(folder) -> TransformerHandle:
    """A checkpoint whose output changes little from step to step (damped timestep embedding, as the 'slow_model'
    of test_step_cache.py), written to a file so that it goes through the node's own loading."""
    path = write_random_flux_checkpoint(folder / "random.safetensors", SMALL, seed=1)
    state = load_file(str(path))
    state = {k: v * 0.1 if k.startswith("time_in.") else v for k, v in state.items()}
    save_file(state, str(folder / "slow.safetensors"))
    return TransformerHandle(folder / "slow.safetensors", "default", CPU)


@pytest.fixture(scope="module")
def vae(folder) -> VaeHandle:
    return VaeHandle(write_random_autoencoder_checkpoint(folder / "ae.safetensors", TINY_VAE, seed=3), CPU)


@pytest.fixture(scope="module")
def diffusers_vae(folder):
    """diffusers' AutoencoderKL with FLUX's latent config, on the weights of `vae` (same seed, diffusers layout)."""
    from diffusers import AutoencoderKL

    weights = write_random_autoencoder_checkpoint(folder / "diffusers_vae", TINY_VAE, seed=3, layout="diffusers")
    reference = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=16, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
        scaling_factor=FLUX_SCALING_FACTOR, shift_factor=FLUX_SHIFT_FACTOR,
    )
    reference.load_state_dict(load_file(str(weights / "diffusion_pytorch_model.safetensors")), strict=True)
    return reference.eval()


def diffusers_pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def diffusers_unpack(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, latent_height * 8, latent_width * 8, 8)


def seeded_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    # float32 on the CPU from torch.manual_seed(seed), as ComfyUI's KSampler draws it.
    return torch.randn(shape, generator=torch.manual_seed(seed), dtype=torch.float32, device="cpu")


def sample(model, latent: dict | None = None, **change) -> tuple[torch.Tensor, str]:
    extra = {} if latent is None else {"latent": latent}
    out = KreaSampler().sample(model, COND, **{**BASE, **change}, **extra)
    (result,) = out["result"]
    (report,) = out["ui"]["text"]
    return result["samples"], report


# ------------------------------------------------------------------------------------------- KreaSampler inputs

def test_same_seed_same_latents_other_seed_other_latents(transformer):
    first, _ = sample(transformer, seed=1)
    again, _ = sample(transformer, seed=1)
    other, _ = sample(transformer, seed=2)
    assert torch.equal(first, again)
    assert rel_err(other, first) > 0.1


def test_node_output_is_the_reference_run_of_its_inputs(transformer):
    # Every sampler input but the defaults' values: the node must hand each one to the engine unchanged.
    latents, report = sample(transformer, width=80, height=48, num_inference_steps=2, guidance_scale=2.0, seed=3,
                             num_images=2)
    txt, extras = COND[0]
    settings = GenerationSettings(width=80, height=48, num_steps=2, guidance=2.0, seed=3, num_images=2)
    expected = generate(transformer.load(), txt, extras["pooled_output"], settings, CPU, torch.float32).latents
    assert torch.equal(latents, expected)
    assert report == "acceleration none: 2 of 2 steps computed fully"


def test_guidance_scale_changes_the_result(transformer):
    # Guidance is the distilled guidance embedding: another value, another image (not a silent 4.5).
    at_default, _ = sample(transformer, guidance_scale=4.5)
    low, _ = sample(transformer, guidance_scale=2.0)
    high, _ = sample(transformer, guidance_scale=8.0)
    assert rel_err(low, at_default) > 1e-3 and rel_err(high, at_default) > 1e-3 and rel_err(low, high) > 1e-3


def test_num_inference_steps_changes_the_result_and_the_report(transformer):
    two, two_report = sample(transformer, num_inference_steps=2)
    four, four_report = sample(transformer, num_inference_steps=4)
    assert two_report == "acceleration none: 2 of 2 steps computed fully"
    assert four_report == "acceleration none: 4 of 4 steps computed fully"
    assert rel_err(two, four) > 1e-3


def test_custom_size_sets_the_latent_shape(transformer):
    latents, _ = sample(transformer, image_size="custom", width=96, height=32, num_inference_steps=1)
    assert latents.shape == (1, 16, 32 // 8, 96 // 8)
    assert latents.dtype == torch.float32 and latents.device.type == "cpu"


def test_preset_image_size_wins_over_width_and_height(transformer):
    # fal's "square" is 512x512; the width/height widgets only count for "custom".
    latents, _ = sample(transformer, image_size="square", width=64, height=48, num_inference_steps=1)
    assert latents.shape == (1, 16, 512 // 8, 512 // 8)


def test_num_images_is_the_batch_and_image_0_is_the_single_image(transformer):
    single, _ = sample(transformer, seed=11, num_images=1)
    batch, _ = sample(transformer, seed=11, num_images=3)
    assert batch.shape == (3, 16, 48 // 8, 64 // 8)
    # The batch's noise is drawn in order from the seed's generator, so image 0 is the single image (up to
    # batched-matmul rounding) and the others are new images.
    assert torch.allclose(batch[0], single[0], atol=1e-5)
    assert rel_err(batch[1], single[0]) > 0.1 and rel_err(batch[2], batch[1]) > 0.1


def test_strength_sets_the_steps_run_and_the_result(transformer):
    image_latent = {"samples": torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(4))}
    # Of a 4-step schedule the last int(4 * strength) steps run (as in diffusers).
    full, full_report = sample(transformer, latent=image_latent, num_inference_steps=4, strength=1.0)
    half, half_report = sample(transformer, latent=image_latent, num_inference_steps=4, strength=0.5)
    quarter, quarter_report = sample(transformer, latent=image_latent, num_inference_steps=4, strength=0.25)
    assert full_report == "acceleration none: 4 of 4 steps computed fully"
    assert half_report == "acceleration none: 2 of 2 steps computed fully"
    assert quarter_report == "acceleration none: 1 of 1 steps computed fully"
    assert rel_err(half, full) > 1e-2 and rel_err(quarter, half) > 1e-2
    # Less strength keeps more of the input image.
    assert rel_err(quarter, image_latent["samples"]) < rel_err(half, image_latent["samples"])


def test_image_to_image_takes_its_size_from_the_latent(transformer):
    image_latent = {"samples": torch.randn(1, 16, 4, 10, generator=torch.Generator().manual_seed(5))}
    latents, _ = sample(transformer, latent=image_latent, image_size="square", num_inference_steps=2, strength=0.5,
                        num_images=2)
    assert latents.shape == (2, 16, 4, 10)


def test_acceleration_reuses_steps_on_a_slowly_changing_model(slow_transformer):
    steps = {"width": 64, "height": 64, "num_inference_steps": 20}
    reference, none_report = sample(slow_transformer, acceleration="none", **steps)
    regular, regular_report = sample(slow_transformer, acceleration="regular", **steps)
    high, high_report = sample(slow_transformer, acceleration="high", **steps)
    assert none_report == "acceleration none: 20 of 20 steps computed fully"

    def reused(report: str) -> int:  # "acceleration regular: 14 of 20 steps computed fully, 6 reused"
        return int(report.rsplit(", ", 1)[1].removesuffix(" reused"))

    assert regular_report.startswith("acceleration regular: ") and high_report.startswith("acceleration high: ")
    assert 0 < reused(regular_report) < reused(high_report) < 20
    # Reused steps change the result, a little (measured: regular ~1%, high ~2%).
    assert 0 < rel_err(regular, reference) < 0.02
    assert rel_err(regular, reference) < rel_err(high, reference) < 0.05


def test_the_report_fields_the_browser_badge_shows(slow_transformer):
    out = KreaSampler().sample(slow_transformer, COND, **{**BASE, "width": 64, "height": 64,
                                                           "num_inference_steps": 20, "acceleration": "high"})
    (fields,) = out["ui"]["krea_report"]
    (text,) = out["ui"]["text"]
    assert text == f"acceleration high: {fields['computed']} of 20 steps computed fully, {fields['reused']} reused"
    assert fields["steps"] == 20 and fields["reused"] > 0 and fields["seconds"] > 0
    assert (fields["width"], fields["height"], fields["images"], fields["acceleration"]) == (64, 64, 1, "high")


# ---------------------------------------------------------------- the latent convention, against diffusers' VAE

def test_encoded_latent_is_the_raw_diffusers_latent(vae, diffusers_vae):
    images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(6))
    (latent,) = KreaEncodeImage().encode(vae, images)
    with torch.no_grad():
        expected = diffusers_vae.encode(images.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    # Raw: no shift, no scaling (native VAEEncode's LATENT).
    assert latent["samples"].shape == expected.shape == (2, 16, 6, 8)
    assert rel_err(latent["samples"], expected) < 1e-4


@dataclass
class RecordingHandle:
    """A MODEL whose transformer records what the transformer is given and returns, call by call."""
    model: torch.nn.Module
    path: Path = Path("recorded.safetensors")
    device: torch.device = CPU
    calls: list[tuple[torch.Tensor, float, torch.Tensor]] = field(default_factory=list)

    def load(self):
        handle = self

        class Recorder(torch.nn.Module):
            config = handle.model.config
            compute_dtype = torch.float32
            img_in = handle.model.img_in

            def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
                v = handle.model.forward_orig(img, img_ids, txt, txt_ids, timesteps, y, guidance)
                handle.calls.append((img.clone(), float(timesteps[0]), v.clone()))
                return v

        return Recorder()


def test_sampler_gives_the_transformer_diffusers_model_space_latents(transformer, vae, diffusers_vae):
    # Image-to-image start, as diffusers' FluxImg2ImgPipeline: the image latent in model space is
    # (raw - shift_factor) * scaling_factor, noised to t0 * noise + (1 - t0) * image, packed in 2x2 patches.
    images = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(8))
    (latent,) = KreaEncodeImage().encode(vae, images)
    recorder = RecordingHandle(transformer.load())
    sample(recorder, latent=latent, num_inference_steps=4, strength=0.5, seed=9)
    first_img, t0, _ = recorder.calls[0]
    assert len(recorder.calls) == 2 and 0.3 < t0 < 0.9  # a real mix of noise and image
    config = diffusers_vae.config
    with torch.no_grad():
        raw = diffusers_vae.encode(images.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    image_model_space = (raw - config.shift_factor) * config.scaling_factor
    expected = diffusers_pack(t0 * seeded_noise(9, (1, 16, 6, 8)) + (1 - t0) * image_model_space)
    assert (first_img - expected).abs().max() < 1e-5


def test_text_to_image_latent_is_raw_as_diffusers_decodes_it(transformer):
    # The transformer's state ends in model space; the LATENT must be what FluxPipeline hands its VAE:
    # latents / scaling_factor + shift_factor.
    recorder = RecordingHandle(transformer.load())
    latents, _ = sample(recorder, num_inference_steps=3, seed=10)
    img, t_last, v = recorder.calls[-1]
    assert recorder.calls[0][1] == 1.0 and torch.equal(recorder.calls[0][0],
                                                       diffusers_pack(seeded_noise(10, (1, 16, 6, 8))))
    final_model_space = diffusers_unpack(img + (0.0 - t_last) * v, 6, 8)
    expected = final_model_space / FLUX_SCALING_FACTOR + FLUX_SHIFT_FACTOR
    assert (latents - expected).abs().max() < 1e-5


def to_image(decoded: torch.Tensor) -> torch.Tensor:
    """diffusers' decoder output (B, 3, H, W) in [-1, 1] -> ComfyUI IMAGE (B, H, W, 3) in [0, 1]."""
    return ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


def test_decode_matches_diffusers_mapped_to_zero_one(vae, diffusers_vae):
    z = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(12))
    (images,) = KreaDecode().decode(vae, {"samples": z})
    with torch.no_grad():
        decoded = diffusers_vae.decode(z).sample
    # The comparison means something only if many pixels are inside (-1, 1), not clamped at either end.
    assert ((decoded > -1) & (decoded < 1)).float().mean() > 0.5 and (decoded < 0).any()
    expected = to_image(decoded)
    assert images.shape == (2, 48, 64, 3) and images.dtype == torch.float32
    assert rel_err(images, expected) < 1e-4
    assert (images - expected).abs().max() < 1e-4


def test_sampler_latent_decodes_in_diffusers_as_in_krea_decode(transformer, vae, diffusers_vae):
    # LATENT is raw: diffusers' decoder takes it as it is (its pipelines unscale before decoding).
    latents, _ = sample(transformer, num_inference_steps=2, seed=13)
    (images,) = KreaDecode().decode(vae, {"samples": latents})
    with torch.no_grad():
        expected = to_image(diffusers_vae.decode(latents).sample)
    assert rel_err(images, expected) < 1e-4


# ------------------------------------------------------------------------------------------ the preview's x0

def test_preview_x0_is_the_flow_matching_prediction():
    # A velocity field with a known clean latent: v = noise - x0 at every step. Euler is exact on it, so every
    # x_t = t * noise + (1 - t) * x0 and every callback must report x0 itself (and x_t - t * v).
    gen = torch.Generator().manual_seed(14)
    clean = torch.randn(2, 16, 4, 6, generator=gen)
    noise = torch.randn(2, 16, 4, 6, generator=gen)
    v_true = diffusers_pack(noise) - diffusers_pack(clean)
    seen: list[tuple[torch.Tensor, float]] = []

    def velocity(x, t_curr, t_next, step):
        seen.append((x.clone(), t_curr))
        return v_true

    reported: list[tuple[int, int, torch.Tensor]] = []
    timesteps = [1.0, 0.8, 0.45, 0.1, 0.0]
    final = denoise(diffusers_pack(noise), timesteps, velocity, (4, 6),
                    callback=lambda step, total, x0: reported.append((step, total, x0.clone())))
    assert [(step, total) for step, total, _ in reported] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for (step, _, x0), (x_t, t) in zip(reported, seen):
        assert x0.shape == clean.shape
        assert torch.allclose(x0, clean, atol=1e-5), step
        assert torch.allclose(x0, diffusers_unpack(x_t - t * v_true, 4, 6), atol=1e-6), step
    assert torch.allclose(final, diffusers_pack(clean), atol=1e-5)


def test_sampler_progress_reports_x0_of_each_step(transformer):
    # At the node: the host's progress reporter gets (step, total, x0) with x0 = x_t - t * v in model space.
    recorder = RecordingHandle(transformer.load())
    reported: list[tuple[int, int, torch.Tensor]] = []
    host.configure(progress=lambda step, total, x0: reported.append((step, total, x0.clone())))
    sample(recorder, num_inference_steps=3, seed=15)
    assert [(step, total) for step, total, _ in reported] == [(1, 3), (2, 3), (3, 3)]
    for (_, _, x0), (x_t, t, v) in zip(reported, recorder.calls):
        expected = diffusers_unpack(x_t - t * v, 6, 8)
        assert x0.shape == (1, 16, 6, 8)
        assert (x0 - expected).abs().max() < 1e-5
        assert rel_err(x0, diffusers_unpack(x_t + t * v, 6, 8)) > 0.1  # the sign matters at this size
