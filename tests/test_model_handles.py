"""The model handles: one loaded model per kind and file (two files of one size and time are two models; a
new model is built only after the old one of its kind was dropped; each kind keeps its own), and inside ComfyUI
what the handles and the nodes ask of its model management: one patcher per model, loaded for the memory each
pass needs, on ComfyUI's devices. ComfyUI's ModelPatcher and load_models_gpu are stood in for by recorders, so that
these run in this process; tests/test_comfyui_host.py runs the same handles with the real ones."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint
from comfyui_krea.model_loader.safety_checker import DEMO_SAFETY_CONFIG, write_random_safety_checkpoint
from comfyui_krea.nodes.handles import SafetyCheckerHandle, VaeHandle
from comfyui_krea.nodes.host import forget_loaded, host
from comfyui_krea.nodes.image import KreaDecode, KreaEncodeImage
from comfyui_krea.nodes.safety import KreaSafetyCheck
from conftest import TINY_AUTOENCODER
from reference_tokenizers import TOKENIZERS, needs_tokenizers

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    yield tmp_path_factory.mktemp("model_handles")
    forget_loaded()


# -------------------------------------------------------------------------------- one model per kind and file

def test_two_files_of_the_same_size_and_time_are_two_models(tmp_path, host_state):
    first = write_random_autoencoder_checkpoint(tmp_path / "a" / "ae.safetensors", TINY_AUTOENCODER, seed=1)
    second = write_random_autoencoder_checkpoint(tmp_path / "b" / "ae.safetensors", TINY_AUTOENCODER, seed=2)
    stat = first.stat()
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert second.stat().st_size == stat.st_size
    assert VaeHandle(first, CPU).load() is not VaeHandle(second, CPU).load()


def test_a_new_model_is_built_only_after_the_old_one_was_dropped(host_state):
    from comfyui_krea.nodes.host import holding

    holding.cached_load("kind", ("first",), lambda: "old model")

    def build() -> str:
        assert "kind" not in holding._loaded  # never two models of a kind at once
        return "new model"

    assert holding.cached_load("kind", ("second",), build) == "new model"


def test_outside_comfyui_each_kind_keeps_its_own_model(tmp_path, host_state, vae_handle):
    model = vae_handle.load()
    path = write_random_safety_checkpoint(tmp_path / "model.safetensors", DEMO_SAFETY_CONFIG, seed=1)
    SafetyCheckerHandle(path, CPU).load()
    assert vae_handle.load() is model  # loading a classifier did not drop the VAE


def test_outside_comfyui_ready_asks_nothing(host_state):
    from comfyui_krea.nodes.host.holding import ModelSlot

    slot = ModelSlot()
    slot.patcher = {"a": "patcher"}
    host_state.models.ready(slot, 5)  # no ComfyUI: nothing to ask, and nothing fails
    assert (slot.key, slot.model) == (None, None)


# ----------------------------------------------- inside ComfyUI: what the handles ask of its model management

def _small_text_encoder_files(folder: Path) -> tuple[Path, Path]:
    """(CLIP file, T5 file) of small random text encoders in their real key layouts."""
    from comfyui_krea.model_loader.text_encoders import (
        CLIPTextConfig,
        T5EncoderConfig,
        write_random_clip_checkpoint,
        write_random_t5_checkpoint,
    )

    clip = write_random_clip_checkpoint(folder / "clip.safetensors", CLIPTextConfig(width=32, layers=1,
                                                                                   intermediate=48))
    t5 = write_random_t5_checkpoint(folder / "t5.safetensors", T5EncoderConfig(d_model=32, d_kv=8, heads=2,
                                                                              d_ff=48, layers=1))
    return clip, t5


@pytest.fixture
def comfyui_side(monkeypatch, host_state):
    """The ComfyUI host's way of holding models (UnderPatchers, as ComfyHost builds it), with ComfyUI's two calls
    (a ModelPatcher, load_models_gpu) stood in for by recorders; the host's devices are ComfyUI's CPU ones."""
    from comfyui_krea.nodes.host.holding import UnderPatchers

    asked: list[tuple] = []

    def managed_model(module, load_device, offload_device):
        patcher = {"module": module, "load": load_device, "offload": offload_device}
        asked.append(("managed", patcher))
        return patcher

    devices = {"text_encoder": (CPU, CPU), "vae": (CPU, CPU), "safety_checker": (CPU, CPU)}
    monkeypatch.setattr(host, "model_devices", lambda kind: devices[kind])
    monkeypatch.setattr(host, "models", UnderPatchers(
        managed_model, lambda patcher, memory: asked.append(("load", patcher, memory)), host.model_devices))
    return asked


def test_inside_comfyui_a_vae_handle_holds_its_model_under_its_own_patcher(comfyui_side, folder):
    from comfyui_krea.model_loader.autoencoder import AutoEncoder
    from comfyui_krea.nodes.host import holding

    path = write_random_autoencoder_checkpoint(folder / "vae_inside.safetensors", TINY_AUTOENCODER, seed=4)
    handle = VaeHandle(path, CPU)
    model = handle.load()
    assert isinstance(model, AutoEncoder) and handle.load() is model  # built once per handle and file
    ((what, patcher),) = comfyui_side
    assert what == "managed" and dict(patcher["module"].named_children()) == {"autoencoder": model}
    assert (patcher["load"], patcher["offload"]) == (CPU, CPU)
    assert handle.slot.key is not None and handle.slot.model is model and handle.slot.patcher is patcher
    assert "vae" not in holding._loaded  # ComfyUI frees it with the node outputs: the pack keeps no reference
    handle.ready(1234)
    assert comfyui_side[-1] == ("load", patcher, 1234)
    other = VaeHandle(path, CPU)
    assert other.load() is not model  # each handle (each loader output) holds its own


@needs_tokenizers
def test_inside_comfyui_the_text_encoders_are_one_patcher_and_use_comfyuis_tokenizers(comfyui_side, folder,
                                                                                     monkeypatch):
    from comfyui_krea.nodes.handles import TextEncoderHandle

    clip, t5 = _small_text_encoder_files(folder)
    monkeypatch.setattr(host, "shipped_tokenizer_dirs", lambda: {"clip": TOKENIZERS / "clip",
                                                                 "t5": TOKENIZERS / "t5"})
    handle = TextEncoderHandle(clip, t5, None, CPU)  # no tokenizer folder named: ComfyUI's are used
    encoders = handle.load()
    ((_, patcher),) = comfyui_side
    assert dict(patcher["module"].named_children()) == {"clip": encoders.clip, "t5": encoders.t5}
    handle.ready()
    assert comfyui_side[-1] == ("load", patcher, 0)
    sequence, pooled = encoders.encode(["a photo"])
    assert sequence.shape[-1] == 32 and pooled.shape[-1] == 32


@needs_tokenizers
def test_another_tokenizer_folder_is_another_text_encoder(tmp_path, host_state):
    import shutil

    from comfyui_krea.nodes.handles import TextEncoderHandle

    clip, t5 = _small_text_encoder_files(tmp_path)
    copy = shutil.copytree(TOKENIZERS, tmp_path / "tokenizers_copy")
    first = TextEncoderHandle(clip, t5, TOKENIZERS, CPU).load()
    assert TextEncoderHandle(clip, t5, copy, CPU).load() is not first


def test_inside_comfyui_the_classifier_is_kept_for_every_safety_check(comfyui_side, tmp_path):
    from comfyui_krea.nodes.host import holding

    path = write_random_safety_checkpoint(tmp_path / "model.safetensors", DEMO_SAFETY_CONFIG, seed=1)
    first = SafetyCheckerHandle(path, CPU)
    checker = first.load()
    ((_, patcher),) = comfyui_side
    assert patcher["module"] is checker.model
    assert holding._loaded["safety_checker"][1] == (checker, patcher)  # no loader node holds it: the pack does
    again = SafetyCheckerHandle(path, CPU)
    assert again.load() is checker and len(comfyui_side) == 1  # the same file: no second model
    again.ready()
    assert comfyui_side[-1] == ("load", patcher, 0)


def test_inside_comfyui_another_classifier_file_is_another_model(comfyui_side, tmp_path):
    a = write_random_safety_checkpoint(tmp_path / "a" / "model.safetensors", DEMO_SAFETY_CONFIG, seed=1)
    b = write_random_safety_checkpoint(tmp_path / "b" / "model.safetensors", DEMO_SAFETY_CONFIG, seed=2)
    assert SafetyCheckerHandle(a, CPU).load() is not SafetyCheckerHandle(b, CPU).load()


def test_inside_comfyui_the_safety_check_loads_its_classifier_for_comfyuis_device(comfyui_side, tmp_path,
                                                                                   monkeypatch):
    path = write_random_safety_checkpoint(tmp_path / "model.safetensors", DEMO_SAFETY_CONFIG, seed=3)
    monkeypatch.setattr(host, "model_path", lambda folder, name: path)
    monkeypatch.setattr(host, "throw_if_interrupted", lambda: None)
    out = KreaSafetyCheck().check(torch.rand(1, 32, 32, 3), True, 0.5, "model.safetensors")
    assert json.loads(out["result"][1]) in ([True], [False])
    assert [entry[0] for entry in comfyui_side] == ["managed", "load"]


@pytest.fixture
def vae_inside_comfyui(comfyui_side, monkeypatch):
    monkeypatch.setattr(host, "throw_if_interrupted", lambda: None)
    monkeypatch.setattr(host, "work_progress", lambda total, node_id=None: lambda done, total_: None)
    monkeypatch.setattr(host, "intermediate_device", lambda: CPU)
    return comfyui_side


def test_inside_comfyui_the_image_nodes_ask_for_their_passes_memory(vae_inside_comfyui, folder):
    path = write_random_autoencoder_checkpoint(folder / "vae_nodes.safetensors", TINY_AUTOENCODER, seed=6)
    handle = VaeHandle(path, CPU)
    latents = KreaEncodeImage().encode(handle, torch.rand(2, 40, 56, 3))[0]["samples"]  # resized to 48x64
    model = handle.load()
    assert vae_inside_comfyui[-1][2] == model.pass_bytes("encode", 2, 48 // 8, 64 // 8, CPU)
    KreaDecode().decode(handle, {"samples": latents})
    assert vae_inside_comfyui[-1][2] == model.pass_bytes("decode", 2, 48 // 8, 64 // 8, CPU)
    assert latents.shape == (2, 16, 6, 8)
