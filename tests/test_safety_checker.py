"""The NSFW classifier against transformers' ViTForImageClassification + ViTImageProcessor, and the node."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.checkpoints import Checkpoint
from comfyui_krea.model_loader.safety_checker import (
    DEMO_SAFETY_CONFIG,
    SafetyCheckerConfig,
    load_safety_checker,
    random_safety_state_dict,
    write_random_safety_checkpoint,
)
from comfyui_krea.model_loader.safety_checker import config_from_checkpoint as read_safety_checker_config
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, handles, host
from comfyui_krea.nodes.handles import SafetyCheckerHandle
from comfyui_krea.nodes.safety import NO_CLASSIFIER, KreaSafetyCheck
from conftest import TINY_SAFETY_CHECKER

SIZES = [(64, 96), (300, 200), (224, 224), (1024, 768)]  # (H, W)


def _u8_images(height: int, width: int, count: int, seed: int) -> np.ndarray:
    """Photo-like uint8 RGB images: smooth colour gradients plus noise, (count, H, W, 3)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    out = []
    for _ in range(count):
        a, b, c = rng.uniform(-1, 1, (3, 1, 1, 3))
        base = 0.5 + 0.35 * np.sin(3 * a * y + 4 * b * x + c)
        noisy = base + rng.normal(0, 0.08, (height, width, 3))
        out.append(np.clip(np.round(noisy * 255), 0, 255).astype(np.uint8))
    return np.stack(out)


def _as_image_batch(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).float() / 255.0  # IMAGE (B, H, W, 3) in 0..1


def _reference_processor():
    from transformers.image_utils import PILImageResampling

    try:  # transformers 5: the Pillow backend is the slow ViTImageProcessor of 4.x that Falconsai used
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:
        from transformers import ViTImageProcessor as processor_class
    # Falconsai/nsfw_image_detection preprocessor_config.json
    return processor_class(do_resize=True, size={"height": 224, "width": 224}, resample=PILImageResampling.BILINEAR,
                           do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _reference_model(folder: Path):
    from transformers import ViTForImageClassification

    model, info = ViTForImageClassification.from_pretrained(str(folder), output_loading_info=True,
                                                            attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nsfw_tiny")
    write_random_safety_checkpoint(folder / "model.safetensors", TINY_SAFETY_CHECKER, seed=3, write_config_json=True)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_folder):
    return _reference_processor(), _reference_model(tiny_folder)


# ---------------------------------------------------------------------------------------------------------
# Classifier


def test_pixel_values_match_vit_image_processor_exactly(reference):
    processor, _ = reference
    checker_config = TINY_SAFETY_CHECKER
    for i, (h, w) in enumerate(SIZES):
        u8 = _u8_images(h, w, 2, seed=i)
        expected = processor(images=[Image.fromarray(im) for im in u8], return_tensors="pt")["pixel_values"]
        from comfyui_krea.model_loader.safety_checker.model import preprocess

        got = preprocess(_as_image_batch(u8), checker_config.image_size)
        assert got.shape == expected.shape == (2, 3, 224, 224) and got.dtype == torch.float32
        assert torch.equal(got, expected), (h, w, (got - expected).abs().max().item())


def test_probabilities_match_transformers(tiny_folder, reference):
    processor, model = reference
    checker = load_safety_checker(tiny_folder / "model.safetensors", "cpu")
    assert checker.config == TINY_SAFETY_CHECKER
    worst_logits = worst_p = 0.0
    spread = []
    for i, (h, w) in enumerate(SIZES):
        u8 = _u8_images(h, w, 2, seed=10 + i)
        pixel_values = processor(images=[Image.fromarray(im) for im in u8], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            expected_logits = model(pixel_values).logits
        expected_p = torch.softmax(expected_logits, -1)[:, model.config.label2id["nsfw"]]
        images = _as_image_batch(u8)
        worst_logits = max(worst_logits, _rel(checker.logits(images), expected_logits))
        p = checker.nsfw_probabilities(images)
        assert p.shape == (2,) and p.dtype == torch.float32
        worst_p = max(worst_p, (p - expected_p).abs().max().item())
        spread += expected_p.tolist()
    assert worst_logits < 1e-5, worst_logits
    assert worst_p < 1e-6, worst_p
    assert max(spread) - min(spread) > 0.05  # the random classifier does tell these images apart


def test_folder_saved_by_transformers_loads(tmp_path, reference):
    processor, model = reference
    model.save_pretrained(tmp_path / "nsfw_image_detection")
    checker = load_safety_checker(tmp_path / "nsfw_image_detection", "cpu")  # HF folder: its config.json
    assert checker.config.num_heads == 2
    u8 = _u8_images(300, 200, 1, seed=7)
    with torch.no_grad():
        expected = model(processor(images=[Image.fromarray(u8[0])], return_tensors="pt")["pixel_values"]).logits
    assert _rel(checker.logits(_as_image_batch(u8)), expected) < 1e-5


def test_state_dict_of_transformers_renamed_modules_loads(tmp_path, reference):
    # transformers 5.2x names the modules vit.layers.N.attention.q_proj, mlp.fc1 ...; a file saved from its
    # state_dict() holds those names, where users' files (and save_pretrained) hold vit.encoder.layer.N...
    processor, model = reference
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("vit.layers.") for k in state) or any(".encoder.layer." in k for k in state)
    folder = tmp_path / "renamed"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    model.config.to_json_file(str(folder / "config.json"))
    checker = load_safety_checker(folder / "model.safetensors", "cpu")
    u8 = _u8_images(120, 90, 1, seed=4)
    with torch.no_grad():
        expected = model(processor(images=[Image.fromarray(u8[0])], return_tensors="pt")["pixel_values"]).logits
    assert _rel(checker.logits(_as_image_batch(u8)), expected) < 1e-5


def test_config_read_off_shapes_without_config_json(tmp_path):
    path = write_random_safety_checkpoint(tmp_path / "demo.safetensors", DEMO_SAFETY_CONFIG, seed=1)
    assert not (tmp_path / "config.json").exists()  # heads = hidden / 64: nothing to write
    config = read_safety_checker_config(Checkpoint(path))
    assert config == DEMO_SAFETY_CONFIG and config.nsfw_index == 1
    checker = load_safety_checker(path)
    # the module's parameters are the file's memory-mapped tensors, not copies
    mapped = Checkpoint(path).tensor("classifier.weight")
    assert torch.equal(checker.model.classifier.weight, mapped)
    p = checker.nsfw_probabilities(_as_image_batch(_u8_images(40, 50, 3, seed=2)))
    assert p.shape == (3,) and bool(((p > 0) & (p < 1)).all())


def test_nsfw_label_index_comes_from_id2label(tmp_path):
    swapped = SafetyCheckerConfig(**{**TINY_SAFETY_CHECKER.__dict__, "labels": ("nsfw", "normal")})
    path = write_random_safety_checkpoint(tmp_path / "model.safetensors", swapped, seed=5)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["id2label"] == {"0": "nsfw", "1": "normal"}
    checker = load_safety_checker(path)
    assert checker.config.nsfw_index == 0
    images = _as_image_batch(_u8_images(224, 224, 2, seed=3))
    assert torch.allclose(checker.nsfw_probabilities(images), torch.softmax(checker.logits(images), -1)[:, 0])
    model = _reference_model(tmp_path)
    assert model.config.id2label[0] == "nsfw"


@pytest.mark.parametrize("label, expected", [("nsfw", 1.0), ("normal", 0.0)])
def test_biased_heads(tmp_path, label, expected):
    path = write_random_safety_checkpoint(tmp_path / "m.safetensors", DEMO_SAFETY_CONFIG, bias_towards=label)
    p = load_safety_checker(path).nsfw_probabilities(_as_image_batch(_u8_images(80, 60, 3, seed=4)))
    assert torch.allclose(p, torch.full((3,), expected), atol=1e-9)


def _fake_file(path: Path, keys: list[str]) -> Path:
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


@pytest.mark.parametrize("keys, named", [
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"], "FLUX transformer"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "FLUX transformer"),
    (["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.mid.block_1.conv1.weight"], "VAE"),
    (["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"], "T5 text encoder"),
    (["text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.mlp.fc1.weight"], "CLIP text"),
    (["vision_model.embeddings.class_embedding", "vision_model.encoder.layers.0.mlp.fc1.weight"], "CLIP vision"),
    (["vision_model.vision_model.embeddings.class_embedding", "concept_embeds"], "Stable Diffusion safety checker"),
    (["embeddings.cls_token", "encoder.layer.0.attention.attention.query.weight"], "without a classification head"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "LoRA"),
    (["some.unrelated.weight"], "are not a ViT"),
])
def test_not_a_classifier_is_named(tmp_path, keys, named):
    path = _fake_file(tmp_path / "other.safetensors", keys)
    with pytest.raises(ModelFileError) as error:
        load_safety_checker(path)
    message = str(error.value)
    assert named in message and str(path) in message and "Falconsai/nsfw_image_detection" in message


def test_other_image_classifier_is_refused(tmp_path):
    imagenet = SafetyCheckerConfig(**{**TINY_SAFETY_CHECKER.__dict__, "labels": tuple(f"class_{i}" for i in range(5))})
    path = write_random_safety_checkpoint(tmp_path / "vit.safetensors", imagenet)
    with pytest.raises(ModelFileError, match="no 'nsfw' label"):
        load_safety_checker(path)


def test_damaged_and_foreign_files(tmp_path):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        load_safety_checker(garbage)
    state = random_safety_state_dict(TINY_SAFETY_CHECKER)
    del state["vit.encoder.layer.1.output.dense.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    with pytest.raises(ModelFileError, match="missing .*layer.1.output.dense.weight"):
        load_safety_checker(tmp_path / "partial.safetensors")


def test_config_json_of_another_model_is_ignored(tmp_path):
    path = write_random_safety_checkpoint(tmp_path / "demo.safetensors", DEMO_SAFETY_CONFIG)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 768, "num_attention_heads": 12}))
    assert read_safety_checker_config(Checkpoint(path)).num_heads == 1


# ---------------------------------------------------------------------------------------------------------
# Node


@pytest.fixture
def models_dir(tmp_path, host_state):
    host_state.configure_standalone(models_dir=tmp_path / "models")
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
    cached_load = handles.cached_load
    monkeypatch.setattr(handles, "cached_load",
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
    monkeypatch.setattr(handles, "cached_load", must_not_load)
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
    _fake_file(folder / "flux1-krea-dev.safetensors", ["double_blocks.0.img_attn.qkv.weight", "img_in.weight"])
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
