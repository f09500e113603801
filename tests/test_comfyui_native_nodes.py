"""The loader's CLIP and VAE inside the real ComfyUI (../shared/comfyui, on the CPU): they are ComfyUI's own types,
ComfyUI's text, sampler, VAE and inpainting nodes take them, the pack's nodes take ComfyUI's own (DualCLIPLoader,
VAELoader), each path equal to the all-pack path within the parity bounds the pack's models are held to against
transformers and diffusers (1e-4); and through ComfyUI's own executor one changed input reloads one model.

Each scenario runs in its own process (tests/comfyui_host/native_nodes.py) and reports measurements as JSON.
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
SCENARIOS = Path(__file__).resolve().parent / "comfyui_host" / "native_nodes.py"
PARITY = 1e-4  # the pack's text encoders and VAE against transformers / diffusers (test_text_encoders, _autoencoder)

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="host tests need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set COMFYUI_DIR to "
                            "the folder it prints (CI does)")


def scenario(name: str, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp(name)
    done = subprocess.run([sys.executable, str(SCENARIOS), name, str(work)], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "COMFYUI_DIR": COMFYUI_DIR}, cwd=SCENARIOS.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return scenario("native_nodes", tmp_path_factory)


def test_the_loader_outputs_comfyuis_own_model_clip_and_vae(native):
    assert native["types"] == ["comfy.model_patcher.ModelPatcher", "comfy.sd.CLIP", "comfy.sd.VAE"]


def test_krea_text_encode_on_the_loaders_clip_and_on_dualcliploaders_equals_the_pack(native):
    text = native["text"]
    assert text["krea_on_loader"] < PARITY and text["krea_on_dualcliploader"] < PARITY


def test_native_clip_text_encode_flux_on_the_loaders_clip_gives_fals_512_tokens(native):
    text = native["text"]
    assert text["native_on_loader"] < PARITY and text["native_guidance"] == 4.5
    assert text["native_on_dualcliploader_tokens"] == 256  # ComfyUI's own FLUX CLIP pads to 256 (not the pack's)


def test_native_text_encode_into_krea_sampler_and_krea_text_encode_into_ksampler(native):
    assert native["krea_sampler_native_text"] < PARITY  # CLIPTextEncodeFlux -> Krea Sampler vs all-pack
    assert native["ksampler_krea_text"] < PARITY  # Krea Text Encode -> KSampler vs the pack's conditioning


def test_native_vae_nodes_on_the_loaders_vae_and_krea_nodes_on_vaeloaders(native):
    vae = native["vae"]
    for path in ("vaedecode", "vaedecodetiled_one_tile", "vaeencode", "krea_decode_on_vaeloader",
                 "krea_encode_on_vaeloader"):
        assert vae[path] < PARITY, path
    # In real tiles ComfyUI blends overlapping tiles (not an untiled decode), exactly as on VAELoader's VAE.
    assert vae["vaedecodetiled_tiles"] == 0 and vae["vaedecodetiled_tiles_vs_untiled"] > PARITY


def test_inpainting_nodes_take_the_loaders_vae(native):
    assert native["inpaint"] == {"latent": [1, 16, 8, 8], "noise_mask": True, "concat_latent": [1, 16, 8, 8],
                                 "latent_mask": True}


def test_a_clip_of_another_model_is_named(native):
    assert "FLUX's text encoders" in native["wrong_clip"] and "DualCLIPLoader with type flux" in native["wrong_clip"]


def test_one_changed_input_reloads_one_model_through_comfyuis_executor(tmp_path_factory):
    """The shipped workflow, run by ComfyUI's PromptExecutor: how often each model was built and the prompt
    encoded, after each change (cumulative)."""
    result = scenario("reloads", tmp_path_factory)
    counts = {step["change"]: (step["transformer"], step["text_encoders"], step["vae"], step["prompt_encoded"])
              for step in result["steps"]}
    assert all(step["success"] for step in result["steps"])
    assert counts == {
        "first run": (1, 1, 1, 1),
        "model_name": (2, 1, 1, 1),  # text encoders and VAE not read again, the prompt not encoded again
        "weight_dtype": (3, 1, 1, 1),
        "clip_name": (3, 2, 1, 2),  # the transformer stays
        "vae_name": (3, 2, 2, 2),
        "prompt": (3, 2, 2, 3),
        "nothing": (3, 2, 2, 3),  # ComfyUI's output cache
    }
    # One model of each kind alive (each replaced one was dropped), and /free's reset frees them all.
    assert result["alive_before_free"] == {"transformer": ["ModelPatcher"], "text_encoders": ["CLIP"],
                                           "vae": ["VAE"]}
    assert result["alive_after_free"] == []
