"""The pack inside the real ComfyUI (../shared/comfyui, on the CPU): its MODEL under ComfyUI's memory management,
native LoRA loaders on it, partial loading, and the pack against ComfyUI's own FLUX on the same file.

Each scenario runs in its own process (tests/comfyui_host/scenarios.py) and reports measurements as JSON.
Run with COMFYUI_DIR set: `../shared/comfyui/setup.sh DIR` prints the folder to use.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
SCENARIOS = Path(__file__).resolve().parent / "comfyui_host" / "scenarios.py"

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="host tests need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set COMFYUI_DIR to "
                            "the folder it prints (CI does)")


def scenario(name: str, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp(name)
    done = subprocess.run([sys.executable, str(SCENARIOS), name, str(work)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return scenario("lora", tmp_path_factory)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return scenario("native", tmp_path_factory)


def test_the_loader_outputs_a_standard_model(lora):
    assert lora["in_comfyui"] and lora["type"] == "ModelPatcher" and lora["holder"] == "Flux"


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfyui"])
def test_native_lora_loader_patches_the_pack_model(lora, fmt):
    result = lora["formats"][fmt]
    assert result["patches"] == 1  # the key map found the layer
    assert result["merge_error"] < 1e-6  # merged weight == W + strength * (alpha / rank) * up @ down (test's own)
    assert result["changed"] > 0.1 and result["image_change"] > 1e-3  # the LoRA changes the weight and the image
    assert result["strength_zero_equal"]  # strength 0 is no LoRA, exactly
    assert result["restored_exactly"]  # unloading gives back the file's weights bit for bit


def test_lora_on_a_scaled_fp8_file_acts_in_real_units(lora):
    fp8 = lora["fp8_scaled"]
    assert "scaled_fp8" in fp8["ops"]  # ComfyUI's own scaled-fp8 layers hold the weights
    # The merged weight is the real weight plus the LoRA up to fp8 rounding, far from the weight without it.
    assert fp8["error_with_lora"] < 0.06 and fp8["error_without_lora"] > 5 * fp8["error_with_lora"]


def test_partial_loading_streams_what_does_not_fit(tmp_path_factory):
    result = scenario("partial", tmp_path_factory)
    assert result["lowvram"] and result["loaded_size"] <= result["budget"] < result["model_size"]
    assert result["streamed"] > 0 and result["resident"] > 0
    assert result["uncovered"] == []  # every weight-holding layer is resident, streamed, or casts by itself
    assert result["identical"]  # the output equals a full load's, bit for bit


def test_comfyui_unloads_and_frees_the_model(tmp_path_factory):
    result = scenario("unload", tmp_path_factory)
    assert result["listed"] == 1 and result["loaded_size"] == result["model_size"]
    assert result["freed"]  # no reference of the pack's own kept the transformer alive


def test_krea_sampler_on_comfyuis_own_flux_equals_the_pack(native):
    assert native["theirs"] == "Flux" and native["ours"] != "Flux"
    assert native["krea_sampler_rel"] < 1e-4


def test_native_ksampler_with_lora_agrees_on_both_models(native):
    assert native["ksampler_lora_rel"] < 1e-3 and native["lora_changed_ksampler"] > 1e-2


def test_acceleration_on_a_native_model_says_it_did_not_apply(native):
    assert "step caching needs the Krea transformer" in native["native_acceleration_report"]


def test_text_encoders_vae_and_classifier_are_under_comfyuis_memory_management(tmp_path_factory):
    result = scenario("other_models", tmp_path_factory)
    # Each model the pack's other nodes ran was loaded by load_models_gpu under its own ModelPatcher ...
    assert result["loaded"] == ["AutoEncoder", "CLIPTextModel T5EncoderModel", "_ViT Linear"]
    assert result["conditioning"] == [1, 512, 48] and result["image"] == [1, 64, 64, 3]
    # ... and unloading with the node outputs gone frees them (ComfyUI's tokenizers were used inside it).
    assert result["after_unload"] == 0 and result["freed"]


def test_a_model_of_another_family_is_named(tmp_path_factory):
    error = scenario("other_family", tmp_path_factory)["error"]
    assert error is not None and "needs a FLUX.1 MODEL" in error and "SDXL" in error
