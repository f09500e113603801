"""What the nodes' messages say: the input that is wrong and what a wrong image or latent looks like, where a
missing model file or classifier belongs (every folder named), and each check at its boundaries (prompt length,
a linked input, a None name, a boolean threshold), before any model loads."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint
from comfyui_krea.nodes import safety as safety_node
from comfyui_krea.nodes.host import host
from comfyui_krea.nodes.image import KreaDecode, KreaEncodeImage, KreaSaveImage, as_image_batch
from comfyui_krea.nodes.model_files import CLIP, VAE, model_file_problems
from comfyui_krea.nodes.safety import NO_CLASSIFIER, KreaSafetyCheck
from comfyui_krea.nodes.text import KreaTextEncode, prompt_problem
from comfyui_krea.sampling.parameters import MAX_PROMPT_CHARS
from conftest import TINY_AUTOENCODER

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------- wrong inputs

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
def test_only_a_4_channel_latent_is_called_a_stable_diffusion_latent(vae_handle, channels, sd):
    with pytest.raises(ValueError) as err:
        KreaDecode().decode(vae_handle, {"samples": torch.zeros(1, channels, 4, 4)})
    assert str(err.value).startswith(f"samples has {channels} channels" + (
        " (a Stable Diffusion 1.x/SDXL latent);" if sd else ";"))


def test_the_nodes_name_the_input_that_is_wrong(vae_handle, output_dir):
    with pytest.raises(ValueError, match=r"^image must be an IMAGE"):
        KreaEncodeImage().encode(vae_handle, "not an image")
    with pytest.raises(ValueError, match=r"^images must be an IMAGE"):
        KreaSaveImage().save("not an image")
    with pytest.raises(ValueError, match=r"^images must be an IMAGE batch \(B, H, W, 3\); got list\.$"):
        KreaSafetyCheck().check([1, 2], True, 0.5, NO_CLASSIFIER)
    with pytest.raises(ValueError, match=r"^images must be an IMAGE batch \(B, H, W, 3\); got \(8, 8, 3\)\.$"):
        KreaSafetyCheck().check(torch.zeros(8, 8, 3), True, 0.5, NO_CLASSIFIER)


def test_a_boolean_threshold_is_refused():
    assert safety_node._threshold_problem(True).startswith("threshold must be a number from 0 to 1")


# ---------------------------------------------------------------------------------------------------- prompts

def test_prompt_problems_and_their_boundaries():
    assert prompt_problem(5) == "prompt must be text, got int."
    assert prompt_problem("a" * MAX_PROMPT_CHARS) is None
    long = prompt_problem("a" * (MAX_PROMPT_CHARS + 1))
    assert long.startswith(f"prompt is {MAX_PROMPT_CHARS + 1} characters long") and long.endswith(
        "(T5 reads the first 512 tokens, about 2000 characters). Shorten it.")
    assert KreaTextEncode.VALIDATE_INPUTS(prompt=None) is True  # linked: checked when the node runs


def test_a_bad_prompt_is_refused_before_any_model_loads(tmp_path):
    from comfyui_krea.nodes.host import TextEncoderHandle

    nowhere = TextEncoderHandle(tmp_path / "no_clip.safetensors", tmp_path / "no_t5.safetensors", None, CPU)
    with pytest.raises(ValueError, match="prompt must be text"):
        KreaTextEncode().encode(nowhere, 5)


# ---------------------------------------------------------------------------------------- missing model files

def test_a_none_name_is_skipped_and_the_next_one_still_checked(host_state, tmp_path):
    host_state.configure(models_dir=tmp_path)
    problems = model_file_problems([("vae", None, VAE, "vae_name"),
                                    ("text_encoders", "missing.safetensors", CLIP, "clip_name")])
    assert len(problems) == 1 and problems[0].startswith("clip_name: Model file 'missing.safetensors' not found")


def test_the_loaders_validation_gives_one_problem_a_line_each_naming_its_input(host_state, tmp_path):
    from comfyui_krea.nodes.loader import KreaModelLoader

    host_state.configure(models_dir=tmp_path)
    message = KreaModelLoader.VALIDATE_INPUTS("m.safetensors", "c.safetensors", "t.safetensors", "v.safetensors")
    lines = message.split("\n")  # ComfyUI lists the text under each input; its readers split it by line
    assert [re.fullmatch(r"(\w+): Model file '(\w)\.safetensors' not found\..*", line).groups() for line in lines] == \
        [("model_name", "m"), ("clip_name", "c"), ("t5_name", "t"), ("vae_name", "v")]
    written = write_random_autoencoder_checkpoint(tmp_path / "x.safetensors", TINY_AUTOENCODER)
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "x.safetensors").write_bytes(written.read_bytes())
    message = KreaModelLoader.VALIDATE_INPUTS("x.safetensors", "x.safetensors", "x.safetensors", "x.safetensors")
    assert [line.split(":")[0] for line in message.split("\n")] == \
        ["model_name", "clip_name", "t5_name"]  # the VAE file is a VAE: no problem there


def test_the_missing_classifier_message_names_the_folder_and_the_file(host_state, tmp_path):
    host_state.configure(models_dir=tmp_path)
    folder = str(tmp_path / "safety_checker")
    sentinel = str(safety_node._no_classifier_error(NO_CLASSIFIER))
    assert sentinel.startswith("The safety check is enabled but no NSFW classifier was found. Put ")
    assert f" in {folder}, refresh the node list" in sentinel
    named = str(safety_node._no_classifier_error("mine.safetensors"))
    assert "no NSFW classifier was found ('mine.safetensors' is not there). Put " in named


def test_the_missing_classifier_message_lists_every_folder_or_says_there_is_none(monkeypatch):
    monkeypatch.setattr(host, "model_search_paths", lambda folder: [Path("/a/safety_checker"),
                                                                    Path("/b/safety_checker")])
    assert " in /a/safety_checker, /b/safety_checker, refresh" in str(safety_node._no_classifier_error(NO_CLASSIFIER))
    monkeypatch.setattr(host, "model_search_paths", lambda folder: [])
    assert " in (no safety_checker folder configured), refresh" in str(
        safety_node._no_classifier_error(NO_CLASSIFIER))


def test_the_safety_checks_validation_names_the_missing_classifier(host_state, tmp_path):
    host_state.configure(models_dir=tmp_path)
    missing = KreaSafetyCheck.VALIDATE_INPUTS(checker_name="gone.safetensors", enable_safety_checker=True)
    assert "no NSFW classifier was found ('gone.safetensors' is not there)" in missing
    sentinel = KreaSafetyCheck.VALIDATE_INPUTS(checker_name=NO_CLASSIFIER, enable_safety_checker=True)
    assert "no NSFW classifier was found. Put " in sentinel


def test_a_clip_file_picked_as_t5_names_the_text_encoder_folder_once(host_state, tmp_path):
    from comfyui_krea.model_loader.text_encoders import write_random_clip_checkpoint
    from comfyui_krea.nodes.model_files import T5
    from conftest import TINY_CLIP

    (tmp_path / "text_encoders").mkdir()
    write_random_clip_checkpoint(tmp_path / "text_encoders" / "clip_l.safetensors", TINY_CLIP)
    host_state.configure(models_dir=tmp_path)
    (problem,) = model_file_problems([("text_encoders", "clip_l.safetensors", T5, "t5_name")])
    assert problem == ("t5_name: 'clip_l.safetensors' is a CLIP text encoder, not a T5 text encoder; pick the right "
                       "file. CLIP text encoder and T5 text encoder files both belong in models/text_encoders.")
