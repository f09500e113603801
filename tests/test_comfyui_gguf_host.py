"""GGUF files inside the real ComfyUI (../shared/comfyui, on the CPU): the pack's loader hands out a standard
MODEL of quantized layers that ComfyUI's LoRA loaders, partial loading and unloading handle; and against
ComfyUI-GGUF (../shared/comfyui-gguf), the pack most users load GGUF files with, on the same file.

Each scenario runs in its own process (tests/comfyui_host/gguf_scenarios.py). Run with COMFYUI_DIR set; the
interop tests also need ComfyUI-GGUF in it: `../shared/comfyui-gguf/setup.sh "$COMFYUI_DIR"`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
SCENARIOS = Path(__file__).resolve().parent / "comfyui_host" / "gguf_scenarios.py"

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="host tests need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set COMFYUI_DIR to "
                            "the folder it prints (CI does)")


def scenario(name: str, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp(name)
    done = subprocess.run([sys.executable, str(SCENARIOS), name, str(work)], capture_output=True, text=True,
                          timeout=1500, env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return scenario("pack_loader", tmp_path_factory)


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    result = scenario("interop", tmp_path_factory)
    if not result["installed"]:
        if os.environ.get("CI"):
            pytest.fail("ComfyUI-GGUF is not installed in COMFYUI_DIR: run ../shared/comfyui-gguf/setup.sh "
                        "\"$COMFYUI_DIR\" in .ci/run")
        pytest.skip("ComfyUI-GGUF is not installed in COMFYUI_DIR: run `../shared/comfyui-gguf/setup.sh "
                    "\"$COMFYUI_DIR\"` for the interop tests")
    return result


def test_the_loader_lists_gguf_files_and_hands_out_a_standard_model_of_quantized_layers(pack):
    assert pack["listed"] and pack["type"] == "ModelPatcher" and pack["holder"] == "Flux"
    assert pack["quantized_layers"] == 23 and pack["weight_dtypes"] == ["torch.uint8"]
    # ComfyUI counts the blocks as stored: what it budgets is what the file holds (plus the rotary buffers).
    assert pack["file_tensor_bytes"] <= pack["model_size"] < 1.01 * pack["file_tensor_bytes"]


def test_krea_sampler_inside_comfyui_equals_the_packs_own_loop(pack):
    assert pack["krea_sampler_vs_standalone"] == 0.0


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "comfyui"])
def test_native_lora_loader_acts_on_the_dequantized_weights(pack, fmt):
    result = pack["formats"][fmt]
    assert result["patches"] == 1  # ComfyUI's key map found the layer
    assert result["merge_error"] < 1e-6  # the layer computes with dequantized W + 0.8 * (alpha / rank) * up @ down
    assert result["blocks_kept"]  # the weight stays GGUF blocks: no dense copy is made for the LoRA
    assert result["low_rank"]  # ComfyUI's LoRA patches run as factors beside the matmul, not on the weight
    assert result["standalone_engine_rel"] < 1e-5  # the pack's own LoRA engine outside ComfyUI: the same image
    assert result["changed"] > 0.1 and result["image_change"] > 1e-3
    assert result["strength_zero_equal"]  # strength 0 is no LoRA, exactly
    assert result["base_after_unload_equal"]  # no patch is left behind on the base MODEL


def test_partial_loading_streams_quantized_layers_with_their_lora(pack):
    partial = pack["partial"]
    assert partial["lowvram"] and partial["loaded_size"] <= partial["budget"] < partial["model_size"]
    assert partial["streamed"] > 0 and partial["resident"] > 0
    assert partial["lora_streamed"]  # ComfyUI's own per-call patch on a streamed layer
    # equals the full load with the same LoRA (streamed layers patch the weight, resident ones add the factors)
    assert partial["partial_rel"] < 1e-5


def test_unloading_frees_the_gguf_model(pack):
    assert pack["freed"]


def test_comfyui_gguf_model_in_krea_sampler_equals_the_packs_loader(interop):
    assert interop["theirs"] == "Flux" and interop["ours"] == "FluxTransformer"
    # ComfyUI-GGUF dequantizes in float16 arithmetic (the pack in float32, as gguf's reference): close, not equal.
    assert interop["krea_sampler_rel"] < 1e-3


def test_native_ksampler_on_the_packs_gguf_model_equals_comfyui_ggufs(interop):
    assert interop["ksampler_rel"] < 1e-3
    assert interop["ksampler_lora_rel"] < 1e-3 and interop["lora_changed"] > 1e-2
