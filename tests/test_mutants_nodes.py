"""Gaps in the node tests that mutation testing (bench/mutation.py --package nodes) found, checked against what a
user of the nodes sees: types that link, messages that say what to do, the boundaries of each check, files
named as documented, the report's fields, cancelling, and the step cache's memory against the cache itself."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint
from comfyui_krea.model_loader.flux import FluxConfig, write_random_flux_checkpoint
from comfyui_krea.model_loader.safety_checker import DEMO_SAFETY_CONFIG, write_random_safety_checkpoint
from comfyui_krea.nodes import NODE_CLASS_MAPPINGS, host
from comfyui_krea.nodes import safety as safety_node
from comfyui_krea.nodes import sampler as sampler_node
from comfyui_krea.nodes.handles import SafetyCheckerHandle, TransformerHandle, VaeHandle, forget_loaded
from comfyui_krea.nodes.image import KreaDecode, KreaEncodeImage, KreaSaveImage, as_image_batch
from comfyui_krea.nodes.model_files import CLIP, VAE, model_file_problems
from comfyui_krea.nodes.safety import NO_CLASSIFIER, KreaSafetyCheck
from comfyui_krea.nodes.sampler import KreaSampler, unpack_conditioning
from comfyui_krea.nodes.text import MAX_PROMPT_CHARS, KreaTextEncode, prompt_problem
from comfyui_krea.sampling.parameters import GUIDANCE_SCALE, STRENGTH
from conftest import TINY_AUTOENCODER
from reference_tokenizers import TOKENIZERS, needs_tokenizers

CPU = torch.device("cpu")
SMALL = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=32,
                   num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))
_gen = torch.Generator().manual_seed(0)
COND = [[torch.randn(1, 7, SMALL.context_in_dim, generator=_gen),
         {"pooled_output": torch.randn(1, SMALL.vec_in_dim, generator=_gen)}]]
BASE = {"image_size": "custom", "width": 64, "height": 48, "num_inference_steps": 3, "guidance_scale": 4.5,
        "seed": 7, "num_images": 1, "acceleration": "none"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    yield tmp_path_factory.mktemp("node_mutants")
    forget_loaded()


@pytest.fixture(scope="module")
def transformer(folder) -> TransformerHandle:
    return TransformerHandle(write_random_flux_checkpoint(folder / "flux.safetensors", SMALL, seed=5), "default", CPU)


@pytest.fixture(scope="module")
def vae(folder) -> VaeHandle:
    return VaeHandle(write_random_autoencoder_checkpoint(folder / "ae.safetensors", TINY_AUTOENCODER, seed=3), CPU)


@pytest.fixture
def output_dir(tmp_path, host_state):
    host_state.configure_standalone(output_dir=tmp_path)
    return tmp_path


def _clock(*readings: float) -> SimpleNamespace:
    """A stand-in for a node module's `time`: perf_counter gives these readings, then repeats the last."""
    left = list(readings)
    return SimpleNamespace(perf_counter=lambda: left.pop(0) if len(left) > 1 else left[0])


# ------------------------------------------------------------------------------------------ types and tooltips

def _input_types(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_every_link_of_the_shipped_workflows_joins_an_output_to_an_input_of_its_type():
    # What ComfyUI's validation checks when a workflow is queued: the output's type is the input's type.
    workflows = sorted((Path(__file__).resolve().parent.parent / "workflows" / "api").glob("*.json"))
    assert workflows
    checked = 0
    for path in workflows:
        prompt = json.loads(path.read_text())
        for node in prompt.values():
            cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
            if cls is None:
                continue
            for name, value in node["inputs"].items():
                if not isinstance(value, list):
                    continue
                source = NODE_CLASS_MAPPINGS.get(prompt[value[0]]["class_type"])
                if source is None:
                    continue
                assert source.RETURN_TYPES[value[1]] == _input_types(cls)[name][0], (path.name, name)
                checked += 1
    assert checked >= 8


def test_every_input_with_options_has_a_tooltip():
    for name, cls in NODE_CLASS_MAPPINGS.items():
        for input_name, spec in _input_types(cls).items():
            if len(spec) > 1:
                assert isinstance(spec[1].get("tooltip"), str) and spec[1]["tooltip"], (name, input_name)


# ------------------------------------------------------------------------------------------------ messages

@pytest.mark.parametrize("shape,hint", [
    ((1, 32, 32, 1), "It is a grayscale image; convert it to RGB (3 channels) first."),
    ((1, 1, 32, 32), "It looks channels-first (batch, channels, height, width); IMAGE is channels-last."),
    ((1, 4, 32, 32), "It looks channels-first (batch, channels, height, width); IMAGE is channels-last."),
    ((1, 8, 32, 32), None)])
def test_a_wrong_channel_count_says_what_the_image_looks_like(shape, hint):
    with pytest.raises(ValueError) as err:
        as_image_batch(torch.zeros(shape), "image")
    message = str(err.value)
    expected_end = f"got shape {shape}." + ("" if hint is None else f" {hint}")
    assert message.startswith("image must have 3 colour channels") and message.endswith(expected_end)


@pytest.mark.parametrize("channels,sd", [(4, True), (8, False)])
def test_only_a_4_channel_latent_is_called_a_stable_diffusion_latent(vae, channels, sd):
    with pytest.raises(ValueError) as err:
        KreaDecode().decode(vae, {"samples": torch.zeros(1, channels, 4, 4)})
    assert str(err.value).startswith(f"samples has {channels} channels" + (
        " (a Stable Diffusion 1.x/SDXL latent);" if sd else ";"))


def test_the_nodes_name_the_input_that_is_wrong(vae, output_dir):
    with pytest.raises(ValueError, match=r"^image must be an IMAGE"):
        KreaEncodeImage().encode(vae, "not an image")
    with pytest.raises(ValueError, match=r"^images must be an IMAGE"):
        KreaSaveImage().save("not an image")
    with pytest.raises(ValueError, match=r"^images must be an IMAGE batch \(B, H, W, 3\); got list\.$"):
        KreaSafetyCheck().check([1, 2], True, 0.5, NO_CLASSIFIER)
    with pytest.raises(ValueError, match=r"^images must be an IMAGE batch \(B, H, W, 3\); got \(8, 8, 3\)\.$"):
        KreaSafetyCheck().check(torch.zeros(8, 8, 3), True, 0.5, NO_CLASSIFIER)


def test_the_missing_classifier_message_names_the_folder_and_the_file(host_state, tmp_path):
    host_state.configure_standalone(models_dir=tmp_path)
    folder = str(tmp_path / "safety_checker")
    sentinel = str(safety_node._no_classifier_error(NO_CLASSIFIER))
    assert sentinel.startswith("The safety check is enabled but no NSFW classifier was found. Put ")
    assert f" in {folder}, refresh the node list" in sentinel
    named = str(safety_node._no_classifier_error("mine.safetensors"))
    assert "no NSFW classifier was found ('mine.safetensors' is not there). Put " in named


def test_prompt_problems_and_their_boundaries():
    assert prompt_problem(5) == "prompt must be text, got int."
    assert prompt_problem("a" * MAX_PROMPT_CHARS) is None
    long = prompt_problem("a" * (MAX_PROMPT_CHARS + 1))
    assert long.startswith(f"prompt is {MAX_PROMPT_CHARS + 1} characters long") and long.endswith(
        "(T5 reads the first 512 tokens, about 2000 characters). Shorten it.")
    assert KreaTextEncode.VALIDATE_INPUTS(prompt=None) is True  # linked: checked when the node runs


def test_a_bad_prompt_is_refused_before_any_model_loads(tmp_path):
    from comfyui_krea.nodes.handles import TextEncoderHandle

    nowhere = TextEncoderHandle(tmp_path / "no_clip.safetensors", tmp_path / "no_t5.safetensors", None, CPU)
    with pytest.raises(ValueError, match="prompt must be text"):
        KreaTextEncode().encode(nowhere, 5)


def test_a_none_name_is_skipped_and_the_next_one_still_checked(host_state, tmp_path):
    host_state.configure_standalone(models_dir=tmp_path)
    problems = model_file_problems([("vae", None, VAE, "vae_name"),
                                    ("text_encoders", "missing.safetensors", CLIP, "clip_name")])
    assert len(problems) == 1 and problems[0].startswith("Model file 'missing.safetensors' not found")


# -------------------------------------------------------------------------------------------- sampler inputs

def test_sampler_ranges_include_their_ends_and_every_value_given_is_checked():
    check = KreaSampler.VALIDATE_INPUTS
    assert check(None, None, guidance_scale=GUIDANCE_SCALE.min, strength=STRENGTH.min) is True
    assert check(None, None, guidance_scale=GUIDANCE_SCALE.max, strength=STRENGTH.max) is True
    # guidance_scale linked (None): strength is still checked.
    assert check(None, None, guidance_scale=None, strength=STRENGTH.max + 1).startswith("strength:")


def test_conditioning_with_extra_entries_or_guidance_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="comfyui_krea.nodes.sampler"):
        unpack_conditioning(COND)
        assert not caplog.records
        unpack_conditioning(COND + COND)
        assert "conditioning holds 2 entries" in caplog.text
        caplog.clear()
        unpack_conditioning([[COND[0][0], {**COND[0][1], "guidance": 3.5}]])
        assert "carries guidance 3.5 (FluxGuidance)" in caplog.text


def test_the_reports_seconds_are_the_sampling_time_in_milliseconds(transformer, monkeypatch):
    monkeypatch.setattr(sampler_node, "time", _clock(100.0, 100.12345))
    out = KreaSampler().sample(transformer, COND, **BASE)
    (fields,) = out["ui"]["krea_report"]
    assert fields["seconds"] == 0.123


def test_cancel_stops_the_sampler_between_transformer_blocks(transformer, host_state):
    # The fal server's cancel sets the event while a step runs: the next block does not start.
    event = threading.Event()
    host_state.configure_standalone(interrupt=event)
    model = transformer.load()
    ran = []
    hooks = [model.double_blocks[0].register_forward_hook(lambda *_: event.set()),
             model.double_blocks[1].register_forward_hook(lambda *_: ran.append(1))]
    try:
        with pytest.raises(host.Interrupted):
            KreaSampler().sample(transformer, COND, **BASE)
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == []


@pytest.mark.parametrize("node", ["encode", "decode"])
def test_cancel_stops_a_tiled_vae_pass_between_tiles(vae, host_state, monkeypatch, node):
    from comfyui_krea.model_loader.autoencoder import tiling

    event = threading.Event()
    host_state.configure_standalone(interrupt=event)
    monkeypatch.setattr(tiling, "available_memory", lambda device: 1)  # the smallest tiles
    model = vae.load()
    ran = []

    def first_tile_runs_then_cancel(*_) -> None:
        ran.append(1)
        event.set()

    hook = model.decoder.conv_in.register_forward_hook(first_tile_runs_then_cancel)
    hook_e = model.encoder.conv_in.register_forward_hook(first_tile_runs_then_cancel)
    try:
        with pytest.raises(host.Interrupted):
            if node == "encode":
                KreaEncodeImage().encode(vae, torch.rand(1, 512, 512, 3))
            else:
                KreaDecode().decode(vae, {"samples": torch.zeros(1, 16, 64, 64)})
    finally:
        hook.remove()
        hook_e.remove()
    assert ran == [1]  # one tile ran, the cancel stopped the rest


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
    KreaSampler().sample(transformer, COND, **{**BASE, "acceleration": "high", "num_images": 2})
    (cache,) = held
    residuals = [t for t in vars(cache).values() if isinstance(t, torch.Tensor)]
    measured = sum(t.numel() * 4 for t in residuals)  # at most 4 bytes an element, whatever the dtype
    assert len(residuals) == 2
    assert sampler_node._step_cache_bytes((2, 16, 6, 8), hidden=SMALL.hidden_size) == measured


# -------------------------------------------------------------------------------------------------- saving

def test_save_defaults_and_batch_numbers_in_names(output_dir):
    images = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    KreaSaveImage().save(images)
    KreaSaveImage().save(images, "b/img_%batch_num%", "png")
    files = sorted(p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file())
    assert files == ["b/img_0_00001_.png", "b/img_1_00002_.png", "krea/krea_00001_.jpg", "krea/krea_00002_.jpg"]
    KreaSaveImage().save(images[:1], "q/explicit", "jpeg", 95)
    assert (output_dir / "krea/krea_00001_.jpg").read_bytes() == (output_dir / "q/explicit_00001_.jpg").read_bytes()


def test_save_quality_must_be_a_whole_number_not_a_boolean(output_dir):
    with pytest.raises(ValueError, match="quality must be an integer from 1 to 100, got True"):
        KreaSaveImage().save(torch.zeros(1, 8, 8, 3), "x", "jpeg", True)


def test_save_prefix_validation(output_dir):
    assert KreaSaveImage.VALIDATE_INPUTS(filename_prefix=None) is True  # linked: checked when the node runs
    assert KreaSaveImage.VALIDATE_INPUTS(filename_prefix=5).startswith("filename_prefix must be a non-empty text")
    assert KreaSaveImage.VALIDATE_INPUTS(filename_prefix="  ").startswith("filename_prefix must be a non-empty text")


def test_save_ignores_a_workflow_that_is_not_a_dict_and_honours_disabled_metadata(output_dir, monkeypatch):
    image = torch.zeros(1, 8, 8, 3)
    out = KreaSaveImage().save(image, "m/a", "png", prompt={"1": {}}, extra_pnginfo="not a workflow")
    saved = Image.open(output_dir / "m" / out["ui"]["images"][0]["filename"])
    assert set(saved.text) == {"prompt"}
    monkeypatch.setattr(host, "metadata_enabled", lambda: False)  # ComfyUI's --disable-metadata
    out = KreaSaveImage().save(image, "m/b", "png", prompt={"1": {}}, extra_pnginfo={"workflow": {}})
    assert Image.open(output_dir / "m" / out["ui"]["images"][0]["filename"]).text == {}


# --------------------------------------------------------------------------------------------- safety check

@pytest.fixture
def classifier(host_state, tmp_path):
    host_state.configure_standalone(models_dir=tmp_path)
    write_random_safety_checkpoint(tmp_path / "safety_checker" / "model.safetensors", DEMO_SAFETY_CONFIG, seed=2)
    return "model.safetensors"


def test_safety_report_fields_and_time(classifier, monkeypatch):
    out = KreaSafetyCheck().check(torch.rand(2, 32, 32, 3), False, 0.5, classifier)
    assert out["ui"]["krea_report"] == [{"has_nsfw_concepts": [False, False], "enabled": False, "seconds": 0.0}]
    assert isinstance(out["ui"]["krea_report"][0]["seconds"], float)
    monkeypatch.setattr(safety_node, "time", _clock(10.0, 10.56789))
    out = KreaSafetyCheck().check(torch.rand(2, 32, 32, 3), True, 0.5, classifier)
    assert out["ui"]["krea_report"][0]["seconds"] == 0.568 and out["ui"]["krea_report"][0]["enabled"] is True


def test_an_empty_batch_is_checked_to_no_flags(classifier):
    out = KreaSafetyCheck().check(torch.zeros(0, 32, 32, 3), True, 0.5, classifier)
    assert out["result"][1] == "[]" and out["result"][0].shape == (0, 32, 32, 3)


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


# ------------------------------------------------------------------------------------------- encode resizing

def _pil_bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL's antialiased bicubic resize of a (H, W, 3) float image, channel by channel in float: an independent
    implementation of the resize KreaEncodeImage documents (bicubic, antialiased, clamped to 0..1)."""
    channels = [np.asarray(Image.fromarray(image[..., c].numpy(), mode="F").resize((width, height),
                                                                                    Image.Resampling.BICUBIC))
                for c in range(3)]
    return torch.from_numpy(np.stack(channels, -1)).clamp(0.0, 1.0)


def test_encode_resizes_as_an_antialiased_bicubic_clamped_to_zero_one(vae, monkeypatch):
    # A 100x100 checkerboard of 0/1 (sharp edges: bicubic overshoots, antialiasing matters) -> 96x96.
    board = ((torch.arange(100)[:, None] // 3 + torch.arange(100)[None, :] // 3) % 2).float()
    image = board[..., None].expand(100, 100, 3).contiguous()
    model = vae.load()
    seen = []
    monkeypatch.setattr(model, "encode", lambda pixels, **kw: seen.append(pixels) or torch.zeros(1, 16, 12, 12))
    KreaEncodeImage().encode(vae, image[None])
    (pixels,) = seen  # what the autoencoder was given, in [-1, 1]
    resized = ((pixels[0] + 1) / 2).permute(1, 2, 0)
    assert resized.shape == (96, 96, 3)
    # measured 7e-6 (float rounding); without antialiasing 0.04, with aligned corners 0.05, unclamped 0.15
    assert (resized - _pil_bicubic(image, 96, 96)).abs().max() < 1e-4


# ------------------------------------------------------------------------------------ the widgets users see

def test_the_samplers_widgets_are_the_parameter_table():
    from comfyui_krea.sampling import parameters as p

    inputs = _input_types(KreaSampler)
    for parameter in (p.WIDTH, p.HEIGHT, p.NUM_INFERENCE_STEPS, p.GUIDANCE_SCALE, p.SEED, p.NUM_IMAGES,
                      p.STRENGTH):
        options = inputs[parameter.name][1]
        expected = {"default": parameter.default, "min": parameter.min, "max": parameter.max}
        if parameter.step is not None:
            expected["step"] = parameter.step
        assert {k: v for k, v in options.items() if k not in ("tooltip", "control_after_generate")} == expected
    assert inputs["seed"][1]["control_after_generate"] is True
    for parameter in (p.IMAGE_SIZE, p.ACCELERATION):
        assert inputs[parameter.name][0] == list(parameter.choices)
        assert inputs[parameter.name][1]["default"] == parameter.default


def test_the_other_nodes_widgets():
    prompt = _input_types(KreaTextEncode)["prompt"][1]
    assert {k: prompt[k] for k in ("multiline", "default", "dynamicPrompts")} == \
        {"multiline": True, "default": "", "dynamicPrompts": True}
    enabled = _input_types(KreaSafetyCheck)["enable_safety_checker"][1]
    assert {k: enabled[k] for k in ("default", "label_on", "label_off")} == \
        {"default": True, "label_on": "enabled", "label_off": "disabled"}
    assert _input_types(KreaSaveImage)["quality"][1]["step"] == 1
    from comfyui_krea.nodes.loader import KreaModelLoader

    assert _input_types(KreaModelLoader)["weight_dtype"][1]["default"] == "default"


def test_an_empty_model_folder_offers_a_placeholder_that_names_it(host_state, tmp_path):
    from comfyui_krea.nodes.loader import KreaModelLoader

    host_state.configure_standalone(models_dir=tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "ae.safetensors").write_bytes(b"")
    inputs = _input_types(KreaModelLoader)
    assert inputs["model_name"][0] == ["(no files in models/diffusion_models)"]
    assert inputs["vae_name"][0] == ["ae.safetensors"]


def test_the_loaders_validation_names_each_input_and_joins_the_problems(host_state, tmp_path):
    from comfyui_krea.nodes.loader import KreaModelLoader

    host_state.configure_standalone(models_dir=tmp_path)
    message = KreaModelLoader.VALIDATE_INPUTS("m.safetensors", "c.safetensors", "t.safetensors", "v.safetensors")
    parts = re.findall(r"Model file '(\w)\.safetensors' not found", message)
    assert parts == ["m", "c", "t", "v"]
    assert ". Model file 'c.safetensors'" in message  # problems joined by one space
    written = write_random_autoencoder_checkpoint(tmp_path / "x.safetensors", TINY_AUTOENCODER)
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "x.safetensors").write_bytes(written.read_bytes())
    message = KreaModelLoader.VALIDATE_INPUTS("x.safetensors", "x.safetensors", "x.safetensors", "x.safetensors")
    assert [p.split(":")[0] for p in re.split(r"(?<=\.) (?=\w+_name:)", message)] == \
        ["model_name", "clip_name", "t5_name"]  # the VAE file is a VAE: no problem there


def test_the_safety_checks_validation_names_the_missing_classifier(host_state, tmp_path):
    host_state.configure_standalone(models_dir=tmp_path)
    missing = KreaSafetyCheck.VALIDATE_INPUTS(checker_name="gone.safetensors", enable_safety_checker=True)
    assert "no NSFW classifier was found ('gone.safetensors' is not there)" in missing
    sentinel = KreaSafetyCheck.VALIDATE_INPUTS(checker_name=NO_CLASSIFIER, enable_safety_checker=True)
    assert "no NSFW classifier was found. Put " in sentinel


# ------------------------------------------------- inside ComfyUI: what the handles ask of its model management
# ComfyUI's ModelPatcher and load_models_gpu are stood in for by recorders here, so that these run in-process
# (and under mutation testing); tests/test_comfyui_host.py runs the same handles with the real ones.

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
    from comfyui_krea.nodes.host import models

    asked: list[tuple] = []

    def managed_model(module, load_device, offload_device):
        patcher = {"module": module, "load": load_device, "offload": offload_device}
        asked.append(("managed", patcher))
        return patcher

    monkeypatch.setattr(host, "IN_COMFYUI", True)
    monkeypatch.setattr(models, "managed_model", managed_model)
    monkeypatch.setattr(models, "load_for_use", lambda patcher, memory: asked.append(("load", patcher, memory)))
    monkeypatch.setattr(host, "model_devices", lambda kind: {
        "text_encoder": (CPU, CPU), "vae": (CPU, CPU), "safety_checker": (CPU, CPU)}[kind])
    return asked


def test_inside_comfyui_a_vae_handle_holds_its_model_under_its_own_patcher(comfyui_side, folder):
    from comfyui_krea.model_loader.autoencoder import AutoEncoder
    from comfyui_krea.nodes import handles

    path = write_random_autoencoder_checkpoint(folder / "vae_inside.safetensors", TINY_AUTOENCODER, seed=4)
    handle = VaeHandle(path, CPU)
    model = handle.load()
    assert isinstance(model, AutoEncoder) and handle.load() is model  # built once per handle and file
    ((what, patcher),) = comfyui_side
    assert what == "managed" and dict(patcher["module"].named_children()) == {"autoencoder": model}
    assert (patcher["load"], patcher["offload"]) == (CPU, CPU)
    assert handle.held.key is not None and handle.held.model is model and handle.held.patcher is patcher
    assert "vae" not in handles._loaded  # ComfyUI frees it with the node outputs: the pack keeps no reference
    handle.ready(1234)
    assert comfyui_side[-1] == ("load", patcher, 1234)
    other = VaeHandle(path, CPU)
    assert other.load() is not model  # each handle (each loader output) holds its own


@needs_tokenizers
def test_inside_comfyui_the_text_encoders_are_one_patcher_and_use_comfyuis_tokenizers(comfyui_side, folder,
                                                                                     monkeypatch):
    from comfyui_krea.nodes.handles import TextEncoderHandle

    clip, t5 = _small_text_encoder_files(folder)
    monkeypatch.setattr(host, "comfyui_tokenizer_dirs", lambda: {"clip": TOKENIZERS / "clip",
                                                                 "t5": TOKENIZERS / "t5"})
    handle = TextEncoderHandle(clip, t5, None, CPU)  # no tokenizer folder named: ComfyUI's are used
    encoders = handle.load()
    ((_, patcher),) = comfyui_side
    assert dict(patcher["module"].named_children()) == {"clip": encoders.clip, "t5": encoders.t5}
    handle.ready()
    assert comfyui_side[-1] == ("load", patcher, 0)
    sequence, pooled = encoders.encode(["a photo"])
    assert sequence.shape[-1] == 32 and pooled.shape[-1] == 32


def test_inside_comfyui_the_classifier_is_kept_for_every_safety_check(comfyui_side, tmp_path):
    from comfyui_krea.nodes import handles

    path = write_random_safety_checkpoint(tmp_path / "model.safetensors", DEMO_SAFETY_CONFIG, seed=1)
    first = SafetyCheckerHandle(path, CPU)
    checker = first.load()
    ((_, patcher),) = comfyui_side
    assert patcher["module"] is checker.model
    assert handles._loaded["safety_checker"][1] == (checker, patcher)  # no loader node holds it: the pack does
    again = SafetyCheckerHandle(path, CPU)
    assert again.load() is checker and len(comfyui_side) == 1  # the same file: no second model
    again.ready()
    assert comfyui_side[-1] == ("load", patcher, 0)


def test_outside_comfyui_ready_asks_nothing(host_state):
    from comfyui_krea.nodes.handles import Held, held_ready

    held = Held()
    held.patcher = {"a": "patcher"}
    held_ready(held, 5)  # no ComfyUI: nothing to ask, and nothing fails
    assert (held.key, held.model) == (None, None)


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
    KreaSampler().sample(transformer, COND, **{**BASE, "num_images": 2, "acceleration": acceleration})
    shape = (2, 16, 48 // 8, 64 // 8)
    extra = 0 if acceleration == "none" else 2 * 2 * (6 // 2) * (8 // 2) * 3072 * 4  # two (B, L, 3072) residuals
    assert asked == [(shape, extra)]


def test_a_native_model_runs_every_step_and_the_report_says_why(transformer, monkeypatch):
    # ComfyUI's own FLUX (Load Diffusion Model) has no step cache: acceleration is refused with a note.
    _recording_loaded_transformer(monkeypatch, pack_model=False)
    out = KreaSampler().sample(transformer, COND, **{**BASE, "acceleration": "high"})
    assert out["ui"]["text"] == ["acceleration high: 3 of 3 steps computed fully; step caching needs the Krea "
                                 "transformer (Krea Model Loader); this model ran every step"]
    plain = KreaSampler().sample(transformer, COND, **{**BASE, "acceleration": "none"})
    assert plain["ui"]["text"] == ["acceleration none: 3 of 3 steps computed fully"]


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


# --------------------------------------------------------------------------------------------- second round

COMFYUI_TYPES = {"IMAGE", "LATENT", "MODEL", "CONDITIONING", "STRING", "INT", "FLOAT", "BOOLEAN"}


def test_every_input_type_is_comfyuis_or_one_a_pack_node_outputs():
    made_here = {t for cls in NODE_CLASS_MAPPINGS.values() for t in cls.RETURN_TYPES}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        for input_name, spec in _input_types(cls).items():
            kind = spec[0]
            assert isinstance(kind, list) or kind in COMFYUI_TYPES | made_here, (name, input_name, kind)


def test_a_size_is_checked_when_the_other_one_is_linked():
    assert KreaSampler.VALIDATE_INPUTS(None, 15).startswith("height")
    assert KreaSampler.VALIDATE_INPUTS(17, None).startswith("width")


def test_a_boolean_threshold_is_refused():
    assert safety_node._threshold_problem(True).startswith("threshold must be a number from 0 to 1")


def test_the_host_gets_whole_numbers(transformer, monkeypatch):
    asked = _recording_loaded_transformer(monkeypatch)
    KreaSampler().sample(transformer, COND, **BASE)
    ((shape, _),) = asked
    assert all(type(n) is int for n in shape)
    assert type(sampler_node._step_cache_bytes((1, 16, 6, 8))) is int


def test_two_files_of_the_same_size_and_time_are_two_models(tmp_path, host_state):
    first = write_random_autoencoder_checkpoint(tmp_path / "a" / "ae.safetensors", TINY_AUTOENCODER, seed=1)
    second = write_random_autoencoder_checkpoint(tmp_path / "b" / "ae.safetensors", TINY_AUTOENCODER, seed=2)
    stat = first.stat()
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert second.stat().st_size == stat.st_size
    assert VaeHandle(first, CPU).load() is not VaeHandle(second, CPU).load()


def test_a_new_model_is_built_only_after_the_old_one_was_dropped(host_state):
    from comfyui_krea.nodes import handles

    handles.cached_load("kind", ("first",), lambda: "old model")

    def build() -> str:
        assert "kind" not in handles._loaded  # never two models of a kind at once
        return "new model"

    assert handles.cached_load("kind", ("second",), build) == "new model"


def test_outside_comfyui_each_kind_keeps_its_own_model(tmp_path, host_state, vae):
    model = vae.load()
    path = write_random_safety_checkpoint(tmp_path / "model.safetensors", DEMO_SAFETY_CONFIG, seed=1)
    SafetyCheckerHandle(path, CPU).load()
    assert vae.load() is model  # loading a classifier did not drop the VAE


def test_inside_comfyui_another_classifier_file_is_another_model(comfyui_side, tmp_path):
    a = write_random_safety_checkpoint(tmp_path / "a" / "model.safetensors", DEMO_SAFETY_CONFIG, seed=1)
    b = write_random_safety_checkpoint(tmp_path / "b" / "model.safetensors", DEMO_SAFETY_CONFIG, seed=2)
    assert SafetyCheckerHandle(a, CPU).load() is not SafetyCheckerHandle(b, CPU).load()


@needs_tokenizers
def test_another_tokenizer_folder_is_another_text_encoder(tmp_path, host_state):
    import shutil

    from comfyui_krea.nodes.handles import TextEncoderHandle

    clip, t5 = _small_text_encoder_files(tmp_path)
    copy = shutil.copytree(TOKENIZERS, tmp_path / "tokenizers_copy")
    first = TextEncoderHandle(clip, t5, TOKENIZERS, CPU).load()
    assert TextEncoderHandle(clip, t5, copy, CPU).load() is not first


def test_save_gives_the_host_the_images_width_and_height(output_dir, monkeypatch):
    asked = []
    real = host.save_image_path

    def save_image_path(prefix, width, height):  # ComfyUI's fills %width% and %height% in the prefix
        asked.append((width, height))
        return real(prefix, width, height)

    monkeypatch.setattr(host, "save_image_path", save_image_path)
    KreaSaveImage().save(torch.zeros(1, 8, 12, 3), "wh/x", "png")
    assert asked == [(12, 8)]


def test_the_missing_classifier_message_lists_every_folder_or_says_there_is_none(monkeypatch):
    monkeypatch.setattr(host, "model_search_paths", lambda folder: [Path("/a/safety_checker"),
                                                                    Path("/b/safety_checker")])
    assert " in /a/safety_checker, /b/safety_checker, refresh" in str(safety_node._no_classifier_error(NO_CLASSIFIER))
    monkeypatch.setattr(host, "model_search_paths", lambda folder: [])
    assert " in (no safety_checker folder configured), refresh" in str(
        safety_node._no_classifier_error(NO_CLASSIFIER))


def test_inside_comfyui_the_safety_check_loads_its_classifier_for_comfyuis_device(comfyui_side, tmp_path,
                                                                                   monkeypatch):
    path = write_random_safety_checkpoint(tmp_path / "model.safetensors", DEMO_SAFETY_CONFIG, seed=3)
    monkeypatch.setattr(host, "model_path", lambda folder, name: path)
    monkeypatch.setattr(host, "throw_if_interrupted", lambda: None)
    out = KreaSafetyCheck().check(torch.rand(1, 32, 32, 3), True, 0.5, "model.safetensors")
    assert json.loads(out["result"][1]) in ([True], [False])
    assert [entry[0] for entry in comfyui_side] == ["managed", "load"]
