"""The NSFW classifier against transformers' ViTForImageClassification + ViTImageProcessor: pixel values,
probabilities, the files and folders it loads (and what it refuses); the node is tests/test_safety_check_node.py."""
from __future__ import annotations

import json
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
from conftest import TINY_SAFETY_CHECKER, zeros_file

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
    path = zeros_file(tmp_path / "other.safetensors", keys)
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
