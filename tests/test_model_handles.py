"""The model handles: one loaded model per kind and file (two files of one size and time are two models; a
new model is built only after the old one of its kind was dropped; each kind keeps its own); a slot keeps one
model per key (the loader's, one per model); Krea Text Encode does not encode the same prompt with the same text
encoder twice; and inside ComfyUI what the safety check's classifier asks of its model management: one patcher,
on ComfyUI's devices. ComfyUI's ModelPatcher and load_models_gpu are stood in for by recorders, so that these run
in this process; tests/test_comfyui_host.py runs the loader's outputs and the classifier with the real ones."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint
from comfyui_krea.model_loader.safety_checker import DEMO_SAFETY_CONFIG, write_random_safety_checkpoint
from comfyui_krea.nodes.handles import SafetyCheckerHandle
from comfyui_krea.nodes.host import VaeHandle, forget_loaded, host
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


def test_a_slot_keeps_one_model_and_rebuilds_only_for_another_key():
    from comfyui_krea.nodes.host.holding import ModelSlot, kept

    slot, built = ModelSlot(), []

    def build(name: str):
        def make() -> str:
            assert slot.model is None  # the old model was dropped first: never two at once
            built.append(name)
            return name
        return make

    assert kept(slot, ("a", "bf16"), build("a")) == "a"
    assert kept(slot, ("a", "bf16"), build("again")) == "a"  # same file and dtype: kept
    assert kept(slot, ("a", "fp8"), build("a fp8")) == "a fp8" and built == ["a", "a fp8"]


def test_the_same_prompt_with_the_same_text_encoder_is_encoded_once(host_state, monkeypatch):
    from comfyui_krea.nodes.text import KreaTextEncode

    encoded = []

    def encode_prompt(text_encoder, prompt):
        encoded.append((text_encoder, prompt))
        return [[torch.zeros(1, 512, 8), {"pooled_output": torch.zeros(1, 4)}]]

    monkeypatch.setattr(host_state, "encode_prompt", encode_prompt)
    class Encoder:  # stands for a loaded CLIP (the node only compares them)
        pass

    node, first, second = KreaTextEncode(), Encoder(), Encoder()
    out = node.encode(first, "a fox")
    assert node.encode(first, "a fox") == out and len(encoded) == 1  # the loader handed out the same encoder
    node.encode(first, "a cat")
    node.encode(second, "a cat")  # another encoder object (another file): encoded again
    assert [p for _, p in encoded] == ["a fox", "a cat", "a cat"]


# ------------------------------------------ inside ComfyUI: what the classifier asks of its model management

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


@needs_tokenizers
def test_another_tokenizer_folder_is_another_text_encoder(tmp_path, host_state):
    import shutil

    from comfyui_krea.nodes.host import TextEncoderHandle

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
