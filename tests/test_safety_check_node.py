"""KreaSafetyCheck: flags and blackens per image (a classifier whose answer is known), the threshold's boundary,
the disabled check (nothing loaded), the report's fields and time, a missing or wrong classifier named with its
folder, the handle reloading when config.json changes, and interrupts between batches."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.safety_checker import (
    DEMO_SAFETY_CONFIG,
    SafetyCheckerConfig,
    random_safety_state_dict,
    write_random_safety_checkpoint,
)
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_krea.nodes import safety as safety_node
from comfyui_krea.nodes.handles import SafetyCheckerHandle
from comfyui_krea.nodes.host import holding, host
from comfyui_krea.nodes.safety import NO_CLASSIFIER, KreaSafetyCheck
from conftest import fake_clock, zeros_file

CPU = torch.device("cpu")


@pytest.fixture
def models_dir(tmp_path, host_state):
    host_state.configure(models_dir=tmp_path / "models")
    return tmp_path / "models"


def test_handle_reloads_when_a_config_json_appears_or_changes(tmp_path, host_state):
    path = write_random_safety_checkpoint(tmp_path / "model.safetensors", DEMO_SAFETY_CONFIG)
    handle = SafetyCheckerHandle(path, torch.device("cpu"))
    first = handle.load()
    assert handle.load() is first and SafetyCheckerHandle(path, torch.device("cpu")).load() is first
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "normal", "1": "nsfw"}}))
    second = handle.load()
    assert second is not first
    # another size as well as another time: file systems with coarse timestamps must see the edit too
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "nsfw", "1": "normal"}}, indent=1))
    assert handle.load() is not second


def test_a_classifier_folder_reloads_when_its_config_json_changes(tmp_path, host_state):
    model_folder = tmp_path / "nsfw_image_detection"
    write_random_safety_checkpoint(model_folder / "model.safetensors", DEMO_SAFETY_CONFIG, seed=1,
                                   write_config_json=True)
    handle = SafetyCheckerHandle(model_folder, CPU)
    first = handle.load()
    config = json.loads((model_folder / "config.json").read_text())
    config["id2label"] = {"0": "nsfw", "1": "normal"}
    (model_folder / "config.json").write_text(json.dumps(config, indent=1))
    assert handle.load() is not first


def _brightness_classifier(path: Path) -> Path:
    """A classifier that says nsfw for images brighter than mid-grey and normal for darker ones.

    Patch tokens embed a patch's mean pixel m as [m, -m, 0, ...]; layer norm turns that into
    4 * sign(m) * [1, -1, 0, ...]. Zero query/key weights make attention uniform, so the [CLS] token
    (zero itself) gathers the average sign; the final layer norm and the head turn its sign into
    logits +-32 apart.
    """
    config = SafetyCheckerConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=8, patch_size=16,
                                 image_size=224)
    state = random_safety_state_dict(config)
    eye = torch.eye(32)
    state["vit.embeddings.cls_token"].zero_()
    state["vit.embeddings.position_embeddings"].zero_()
    projection = torch.zeros(32, 3, 16, 16)
    projection[0], projection[1] = 1 / (3 * 256), -1 / (3 * 256)
    state["vit.embeddings.patch_embeddings.projection.weight"] = projection
    state["vit.embeddings.patch_embeddings.projection.bias"] = torch.zeros(32)
    block = "vit.encoder.layer.0"
    for name in ("layernorm_before", "layernorm_after"):
        state[f"{block}.{name}.weight"], state[f"{block}.{name}.bias"] = torch.ones(32), torch.zeros(32)
    state["vit.layernorm.weight"], state["vit.layernorm.bias"] = torch.ones(32), torch.zeros(32)
    for name, weight in (("attention.attention.query", 0 * eye), ("attention.attention.key", 0 * eye),
                         ("attention.attention.value", eye.clone()), ("attention.output.dense", eye.clone()),
                         ("output.dense", torch.zeros(32, 8))):
        state[f"{block}.{name}.weight"], state[f"{block}.{name}.bias"] = weight, torch.zeros(32)
    head = torch.zeros(2, 32)
    head[1, 0], head[0, 0] = 4.0, -4.0  # rows: normal, nsfw
    state["classifier.weight"], state["classifier.bias"] = head, torch.zeros(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    (path.parent / "config.json").write_text(json.dumps({"num_attention_heads": 2,
                                                         "id2label": {"0": "normal", "1": "nsfw"}}))
    return path


def _bright_and_dark(pattern: str, height: int = 96, width: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = []
    for kind in pattern:
        low = 0.6 if kind == "B" else 0.0
        images.append(low + 0.4 * torch.rand(height, width, 3, generator=generator))
    return torch.stack(images)


def _run(images, enabled=True, threshold=0.5, checker_name="model.safetensors"):
    out = KreaSafetyCheck().check(images=images, enable_safety_checker=enabled, threshold=threshold,
                                  checker_name=checker_name)
    assert set(out) == {"ui", "result"}
    result_images, flags_json = out["result"]
    assert out["ui"]["text"] == [flags_json]
    (fields,) = out["ui"]["krea_report"]  # what the browser's badge shows
    assert fields["has_nsfw_concepts"] == json.loads(flags_json) and fields["enabled"] == enabled
    return result_images, json.loads(flags_json)


def test_node_registration_and_inputs(models_dir):
    assert NODE_DISPLAY_NAME_MAPPINGS["KreaSafetyCheck"] == "Krea Safety Check"
    assert NODE_CLASS_MAPPINGS["KreaSafetyCheck"] is KreaSafetyCheck
    assert KreaSafetyCheck.CATEGORY == "Krea/image" and KreaSafetyCheck.RETURN_TYPES == ("IMAGE", "STRING")
    required = KreaSafetyCheck.INPUT_TYPES()["required"]
    assert required["checker_name"][0] == [NO_CLASSIFIER]  # empty folder: the combo still validates
    assert required["enable_safety_checker"][1]["default"] is True
    assert {k: required["threshold"][1][k] for k in ("default", "min", "max", "step")} == \
        {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}
    write_random_safety_checkpoint(models_dir / "safety_checker" / "nsfw" / "model.safetensors", DEMO_SAFETY_CONFIG)
    assert KreaSafetyCheck.INPUT_TYPES()["required"]["checker_name"][0] == ["nsfw/model.safetensors"]
    assert KreaSafetyCheck.VALIDATE_INPUTS(checker_name="elsewhere.safetensors") is True


def test_mixed_batch_flags_and_blackens_per_image(models_dir, monkeypatch):
    _brightness_classifier(models_dir / "safety_checker" / "model.safetensors")
    interrupt_checks = []
    monkeypatch.setattr(host, "throw_if_interrupted", lambda: interrupt_checks.append(1))
    images = _bright_and_dark("BDBDB")  # 5 images: two forward passes of at most 4
    original = images.clone()
    out, flags = _run(images)
    assert flags == [True, False, True, False, True]
    assert len(interrupt_checks) == 2
    assert out.shape == images.shape and out.dtype == torch.float32
    for i, flagged in enumerate(flags):
        if flagged:
            assert torch.count_nonzero(out[i]) == 0
        else:
            assert torch.equal(out[i], original[i])
    assert torch.equal(images, original)  # the input batch is not modified in place
    # a different size goes through the same classifier (cached, not reloaded)
    builds = []
    cached_load = holding.cached_load
    monkeypatch.setattr(holding, "cached_load",
                        lambda kind, key, build: cached_load(kind, key, lambda: builds.append(kind) or build()))
    out, flags = _run(_bright_and_dark("DB", height=1024, width=768))
    assert flags == [False, True] and not builds
    assert out.shape == (2, 1024, 768, 3) and torch.count_nonzero(out[1]) == 0


@pytest.mark.parametrize("label, flagged", [("nsfw", True), ("normal", False)])
def test_biased_heads_through_the_node(models_dir, label, flagged):
    write_random_safety_checkpoint(models_dir / "safety_checker" / "model.safetensors", DEMO_SAFETY_CONFIG,
                                   bias_towards=label)
    images = _bright_and_dark("BDB", height=64, width=96)
    out, flags = _run(images)
    assert flags == [flagged] * 3
    if flagged:
        assert torch.count_nonzero(out) == 0 and out.shape == images.shape
    else:
        assert out is images


def test_threshold_boundary_is_not_flagged(models_dir):
    state = random_safety_state_dict(DEMO_SAFETY_CONFIG)
    state["classifier.weight"].zero_()
    state["classifier.bias"].zero_()  # equal logits: P(nsfw) is exactly 0.5
    (models_dir / "safety_checker").mkdir(parents=True)
    save_file(state, str(models_dir / "safety_checker" / "model.safetensors"))
    images = _bright_and_dark("BD")
    assert _run(images, threshold=0.5)[1] == [False, False]
    assert _run(images, threshold=0.49)[1] == [True, True]
    assert _run(images, threshold=1.0)[1] == [False, False]


def test_disabled_passes_through_without_loading(models_dir, monkeypatch):
    def must_not_load(*args):
        raise AssertionError("the classifier was loaded")

    monkeypatch.setattr(SafetyCheckerHandle, "load", must_not_load)
    monkeypatch.setattr(holding, "cached_load", must_not_load)
    images = _bright_and_dark("BDB")
    out, flags = _run(images, enabled=False, checker_name=NO_CLASSIFIER)
    assert out is images and flags == [False, False, False]


@pytest.mark.parametrize("checker_name", [NO_CLASSIFIER, "model.safetensors"])
def test_enabled_without_classifier_names_the_folder(models_dir, checker_name):
    with pytest.raises(ModelFileError) as error:
        _run(_bright_and_dark("B"), checker_name=checker_name)
    message = str(error.value)
    assert str(models_dir / "safety_checker") in message
    assert "model.safetensors" in message and "Falconsai/nsfw_image_detection" in message


def test_node_refuses_a_flux_file(models_dir):
    folder = models_dir / "safety_checker"
    folder.mkdir(parents=True)
    zeros_file(folder / "flux1-krea-dev.safetensors", ["double_blocks.0.img_attn.qkv.weight", "img_in.weight"])
    with pytest.raises(ModelFileError, match="FLUX transformer"):
        _run(_bright_and_dark("B"), checker_name="flux1-krea-dev.safetensors")


@pytest.mark.parametrize("threshold", [-0.01, 1.5, math.nan])
def test_threshold_out_of_range_is_refused(models_dir, threshold):
    with pytest.raises(ValueError, match="threshold must be a number from 0 to 1|threshold: nan is not a finite"):
        _run(_bright_and_dark("B"), enabled=False, threshold=threshold)


def test_interrupt_stops_between_batches(models_dir, monkeypatch):
    write_random_safety_checkpoint(models_dir / "safety_checker" / "model.safetensors", DEMO_SAFETY_CONFIG)
    calls = []

    class Interrupted(Exception):
        pass

    def interrupt_on_second():
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted

    monkeypatch.setattr(host, "throw_if_interrupted", interrupt_on_second)
    with pytest.raises(Interrupted):
        _run(_bright_and_dark("BBBBBB", height=32, width=32))


# ------------------------------------------------------------------------------------------------- the report

@pytest.fixture
def classifier(host_state, tmp_path):
    host_state.configure(models_dir=tmp_path)
    write_random_safety_checkpoint(tmp_path / "safety_checker" / "model.safetensors", DEMO_SAFETY_CONFIG, seed=2)
    return "model.safetensors"


def test_safety_report_fields_and_time(classifier, monkeypatch):
    out = KreaSafetyCheck().check(torch.rand(2, 32, 32, 3), False, 0.5, classifier)
    assert out["ui"]["krea_report"] == [{"has_nsfw_concepts": [False, False], "enabled": False, "seconds": 0.0}]
    assert isinstance(out["ui"]["krea_report"][0]["seconds"], float)
    monkeypatch.setattr(safety_node, "time", fake_clock(10.0, 10.56789))
    out = KreaSafetyCheck().check(torch.rand(2, 32, 32, 3), True, 0.5, classifier)
    assert out["ui"]["krea_report"][0]["seconds"] == 0.568 and out["ui"]["krea_report"][0]["enabled"] is True


def test_an_empty_batch_is_checked_to_no_flags(classifier):
    out = KreaSafetyCheck().check(torch.zeros(0, 32, 32, 3), True, 0.5, classifier)
    assert out["result"][1] == "[]" and out["result"][0].shape == (0, 32, 32, 3)
