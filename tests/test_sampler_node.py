"""KreaSampler input handling: ranges refused before any model loads, sizes, conditioning checks."""
import pytest
import torch

from comfyui_krea.nodes.sampler import KreaSampler
from comfyui_krea.sampling.parameters import IMAGE_SIZES, resolve_size


class NeverLoaded:
    """A KREA_MODEL handle that fails the test if anything tries to load the model."""
    device = torch.device("cpu")

    def load(self):
        raise AssertionError("the model was loaded although the input was invalid")


COND = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 16)}]]
GOOD = dict(image_size="custom", width=64, height=48, num_inference_steps=4, guidance_scale=4.5, seed=0,
            num_images=1, acceleration="none")


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
