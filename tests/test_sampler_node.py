"""KreaSampler input handling: ranges refused before any model loads, sizes, conditioning checks; and on a small
random-weight model, what it asks of the host (its latents' and the step cache's memory, in whole bytes), its report
(seconds, a native model's note), and a cancel that stops it between transformer blocks."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from comfyui_krea.model_loader.flux import FluxConfig, write_random_flux_checkpoint
from comfyui_krea.nodes import sampler as sampler_node
from comfyui_krea.nodes.host import Interrupted, TransformerHandle, forget_loaded, host
from comfyui_krea.nodes.sampler import KreaSampler, unpack_conditioning
from comfyui_krea.sampling.parameters import GUIDANCE_SCALE, IMAGE_SIZES, STRENGTH, resolve_size
from conftest import fake_clock


class NeverLoaded:
    """A KREA_MODEL handle that fails the test if anything tries to load the model."""
    device = torch.device("cpu")

    def load(self):
        raise AssertionError("the model was loaded although the input was invalid")


COND = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 16)}]]
GOOD = dict(image_size="custom", width=64, height=48, num_inference_steps=4, guidance_scale=4.5, seed=0,
            num_images=1, acceleration="none")
# Random conditioning and a run of 3 steps for the small model below.
CPU = torch.device("cpu")
SMALL = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=32,
                   num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))
_gen = torch.Generator().manual_seed(0)
RANDOM_COND = [[torch.randn(1, 7, SMALL.context_in_dim, generator=_gen),
                {"pooled_output": torch.randn(1, SMALL.vec_in_dim, generator=_gen)}]]
BASE = {"image_size": "custom", "width": 64, "height": 48, "num_inference_steps": 3, "guidance_scale": 4.5,
        "seed": 7, "num_images": 1, "acceleration": "none"}


@pytest.mark.parametrize("change,message", [
    ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 50"),
    ({"num_inference_steps": 51}, "num_inference_steps must be between 1 and 50"),
    ({"guidance_scale": 0.5}, "guidance_scale must be between 1.0 and 20.0"),
    ({"guidance_scale": 21.0}, "guidance_scale must be between 1.0 and 20.0"),
    ({"num_images": 5}, "num_images must be between 1 and 4"),
    ({"num_images": 0}, "num_images must be between 1 and 4"),
    ({"width": 1000}, "width must be a multiple of 16"),
    ({"height": 14144}, "height must be a multiple of 16 between 16 and 14142"),
    ({"seed": -1}, "seed must be between 0"),
    ({"strength": 0.0}, "strength must be between 0.01 and 1.0"),
    ({"acceleration": "turbo"}, "acceleration 'turbo' is not one of"),
])
def test_out_of_range_refused_before_loading(change, message):
    with pytest.raises(ValueError, match=message):
        KreaSampler().sample(NeverLoaded(), COND, **{**GOOD, **change})


@pytest.mark.parametrize("width,height,ok", [(1024, 768, True), (1000, 768, False), (16, 16, True),
                                             (14128, 16, True), (14144, 16, False), (0, 16, False)])
def test_validate_inputs_checks_sides(width, height, ok):
    result = KreaSampler.VALIDATE_INPUTS(width=width, height=height)
    assert (result is True) == ok
    if not ok:
        assert "multiple of 16" in result


def test_presets_are_fal_sizes():
    assert resolve_size("square_hd", 0, 0) == (1024, 1024)
    assert resolve_size("landscape_4_3", 0, 0) == (1024, 768)
    assert resolve_size("portrait_16_9", 0, 0) == (576, 1024)
    assert resolve_size("custom", 1280, 720) == (1280, 720)
    assert len(IMAGE_SIZES) == 6


def test_input_types_carry_fal_ranges_and_defaults():
    spec = KreaSampler.INPUT_TYPES()
    req, opt = spec["required"], spec["optional"]
    assert req["image_size"][1]["default"] == "landscape_4_3"
    assert (req["num_inference_steps"][1]["min"], req["num_inference_steps"][1]["max"],
            req["num_inference_steps"][1]["default"]) == (1, 50, 28)
    assert (req["guidance_scale"][1]["min"], req["guidance_scale"][1]["max"],
            req["guidance_scale"][1]["default"]) == (1.0, 20.0, 4.5)
    assert req["seed"][1]["max"] == 2**64 - 1 and req["seed"][1]["control_after_generate"]
    assert (req["num_images"][1]["min"], req["num_images"][1]["max"]) == (1, 4)
    assert (opt["strength"][1]["min"], opt["strength"][1]["max"], opt["strength"][1]["default"]) == (0.01, 1.0, 0.95)


def test_bad_conditioning_and_latent_are_explained():
    with pytest.raises(ValueError, match="pooled_output"):
        KreaSampler().sample(NeverLoaded(), [[torch.zeros(1, 8, 32), {}]], **GOOD)
    with pytest.raises(ValueError, match="16, H/8, W/8"):
        KreaSampler().sample(NeverLoaded(), COND, **GOOD, latent={"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="multiples of 16"):
        KreaSampler().sample(NeverLoaded(), COND, **GOOD, latent={"samples": torch.zeros(1, 16, 9, 8)})


@pytest.mark.parametrize("inputs, message", [
    ({"guidance_scale": float("nan")}, "guidance_scale: nan is not a finite number"),
    ({"guidance_scale": 25.0}, "guidance_scale: 25.0 is bigger than the maximum 20.0"),
    ({"strength": 0.0}, "strength: 0.0 is smaller than the minimum 0.01"),
    ({"strength": float("inf")}, "strength: inf is not a finite number"),
    ({"strength": "0.5"}, "strength: '0.5' is not a number"),
])
def test_validate_inputs_refuses_nan_and_out_of_range_floats(inputs, message):
    # ComfyUI's own min/max check lets NaN through; the node's validation must not, before any model loads.
    result = KreaSampler.VALIDATE_INPUTS(width=1024, height=768, **inputs)
    assert result is not True and message in result


def test_safety_check_validation_refuses_a_nan_threshold():
    from comfyui_krea.nodes.safety import KreaSafetyCheck

    assert "threshold: nan is not a finite number" in KreaSafetyCheck.VALIDATE_INPUTS(threshold=float("nan"))
    assert "threshold must be a number from 0 to 1" in KreaSafetyCheck.VALIDATE_INPUTS(threshold=1.5)
    assert KreaSafetyCheck.VALIDATE_INPUTS(threshold=0.5) is True


# ----------------------------------------------------------------------------- on a small random-weight model

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    yield tmp_path_factory.mktemp("sampler_node")
    forget_loaded()


@pytest.fixture(scope="module")
def transformer(folder) -> TransformerHandle:
    return TransformerHandle(write_random_flux_checkpoint(folder / "flux.safetensors", SMALL, seed=5), "default", CPU)


# --------------------------------------------------------------------------------- checks at their boundaries

def test_sampler_ranges_include_their_ends_and_every_value_given_is_checked():
    check = KreaSampler.VALIDATE_INPUTS
    assert check(None, None, guidance_scale=GUIDANCE_SCALE.min, strength=STRENGTH.min) is True
    assert check(None, None, guidance_scale=GUIDANCE_SCALE.max, strength=STRENGTH.max) is True
    # guidance_scale linked (None): strength is still checked.
    assert check(None, None, guidance_scale=None, strength=STRENGTH.max + 1).startswith("strength:")


def test_a_size_is_checked_when_the_other_one_is_linked():
    assert KreaSampler.VALIDATE_INPUTS(None, 15).startswith("height")
    assert KreaSampler.VALIDATE_INPUTS(17, None).startswith("width")


def test_conditioning_with_extra_entries_or_guidance_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="comfyui_krea.nodes.sampler"):
        unpack_conditioning(RANDOM_COND)
        assert not caplog.records
        unpack_conditioning(RANDOM_COND + RANDOM_COND)
        assert "conditioning holds 2 entries" in caplog.text
        caplog.clear()
        unpack_conditioning([[RANDOM_COND[0][0], {**RANDOM_COND[0][1], "guidance": 3.5}]])
        assert "carries guidance 3.5 (FluxGuidance)" in caplog.text


# --------------------------------------------------------------------------------------- the report, a cancel

def test_the_reports_seconds_are_the_sampling_time_in_milliseconds(transformer, monkeypatch):
    monkeypatch.setattr(sampler_node, "time", fake_clock(100.0, 100.12345))
    out = KreaSampler().sample(transformer, RANDOM_COND, **BASE)
    (fields,) = out["ui"]["krea_report"]
    assert fields["seconds"] == 0.123


def test_cancel_stops_the_sampler_between_transformer_blocks(transformer, host_state):
    # The fal server's cancel sets the event while a step runs: the next block does not start.
    event = threading.Event()
    host_state.configure(interrupt=event)
    model = transformer.load()
    ran = []
    hooks = [model.double_blocks[0].register_forward_hook(lambda *_: event.set()),
             model.double_blocks[1].register_forward_hook(lambda *_: ran.append(1))]
    try:
        with pytest.raises(Interrupted):
            KreaSampler().sample(transformer, RANDOM_COND, **BASE)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == []


# -------------------------------------------------------------------------- what the sampler asks of the host

def _recording_loaded_transformer(monkeypatch, pack_model: bool = True) -> list:
    import dataclasses

    asked = []
    real = host.loaded_transformer

    def loaded_transformer(model, latent_shape, extra_bytes=0):
        asked.append((latent_shape, extra_bytes))
        return dataclasses.replace(real(model, latent_shape, extra_bytes), is_pack_model=pack_model)

    monkeypatch.setattr(host, "loaded_transformer", loaded_transformer)
    return asked


@pytest.mark.parametrize("acceleration", ["none", "regular"])
def test_the_sampler_asks_the_host_for_its_latents_and_the_step_caches_memory(transformer, monkeypatch,
                                                                             acceleration):
    asked = _recording_loaded_transformer(monkeypatch)
    KreaSampler().sample(transformer, RANDOM_COND, **{**BASE, "num_images": 2, "acceleration": acceleration})
    shape = (2, 16, 48 // 8, 64 // 8)
    extra = 0 if acceleration == "none" else 2 * 2 * (6 // 2) * (8 // 2) * 3072 * 4  # two (B, L, 3072) residuals
    assert asked == [(shape, extra)]


def test_the_step_cache_memory_asked_for_is_what_the_cache_holds(transformer, monkeypatch):
    # The bytes the sampler asks the host to keep free for the step cache, against the cache's own tensors.
    from comfyui_krea.model_loader.flux import FluxConfig as Config
    from comfyui_krea.sampling import step_cache

    shape = (1, 16, 8, 8)  # by default, for FLUX.1's width (3072)
    assert sampler_node._step_cache_bytes(shape) == sampler_node._step_cache_bytes(shape, Config().hidden_size)
    held = []
    original = step_cache.StepCache.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        held.append(self)

    monkeypatch.setattr(step_cache.StepCache, "__init__", keep)
    KreaSampler().sample(transformer, RANDOM_COND, **{**BASE, "acceleration": "high", "num_images": 2})
    (cache,) = held
    residuals = [t for t in vars(cache).values() if isinstance(t, torch.Tensor)]
    measured = sum(t.numel() * 4 for t in residuals)  # at most 4 bytes an element, whatever the dtype
    assert len(residuals) == 2
    assert sampler_node._step_cache_bytes((2, 16, 6, 8), hidden=SMALL.hidden_size) == measured


def test_the_host_gets_whole_numbers(transformer, monkeypatch):
    asked = _recording_loaded_transformer(monkeypatch)
    KreaSampler().sample(transformer, RANDOM_COND, **BASE)
    ((shape, _),) = asked
    assert all(type(n) is int for n in shape)
    assert type(sampler_node._step_cache_bytes((1, 16, 6, 8))) is int


def test_a_native_model_runs_every_step_and_the_report_says_why(transformer, monkeypatch):
    # ComfyUI's own FLUX (Load Diffusion Model) has no step cache: acceleration is refused with a note.
    _recording_loaded_transformer(monkeypatch, pack_model=False)
    out = KreaSampler().sample(transformer, RANDOM_COND, **{**BASE, "acceleration": "high"})
    assert out["ui"]["text"] == ["acceleration high: 3 of 3 steps computed fully; step caching needs the Krea "
                                 "transformer (Krea Model Loader); this model ran every step"]
    plain = KreaSampler().sample(transformer, RANDOM_COND, **{**BASE, "acceleration": "none"})
    assert plain["ui"]["text"] == ["acceleration none: 3 of 3 steps computed fully"]


@pytest.mark.parametrize("features, variant", [(384, "FLUX.1 Fill"), (128, "FLUX.1 Depth or FLUX.1 Canny"),
                                               (96, "a FLUX variant this pack does not know")])
def test_a_flux_variant_with_other_input_features_is_refused_by_name(folder, features, variant):
    """FLUX.1 Fill's img_in takes 384 features per token (latent, masked image, mask), Depth and Canny 128: Krea
    Sampler runs text-to-image models (64) and says which variant it was given."""
    config = FluxConfig(**{**vars(SMALL), "in_channels": features})
    handle = TransformerHandle(write_random_flux_checkpoint(folder / f"variant{features}.safetensors", config, seed=5),
                               "default", CPU)
    with pytest.raises(ValueError) as refused:
        KreaSampler().sample(handle, RANDOM_COND, **BASE)
    message = str(refused.value)
    assert message.startswith(f"the model is {variant}") and f"takes {features} features" in message
    assert "where text-to-image FLUX.1 models (FLUX.1 [dev], FLUX.1 Krea [dev]) take 64" in message
    forget_loaded()
