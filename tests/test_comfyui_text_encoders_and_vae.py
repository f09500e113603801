"""The text encoders and VAE the pack's loader hands out inside ComfyUI (nodes/host/comfyui_models.py, through the
host of comfyui_host.py): ComfyUI's own CLIP of type FLUX and VAE, built from the tensors of the files the user
picked, with the T5 sizes of the file and FLUX.1 [dev]'s 512 T5 tokens; the refusals of encoders and VAEs of other
sizes or families before anything is built; the tokens handed to ComfyUI's encoder, the images to its VAE and what
comes back.

In-process over the stand-ins of tests/comfyui_adapter_stand_ins.py; what the real ComfyUI builds of the same files
is checked in tests/test_comfyui_host*.py.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from comfyui_adapter_stand_ins import adapter_over_stand_ins, write_zero_checkpoint
from tokenizers import Tokenizer

from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.autoencoder import FLUX_AUTOENCODER, AutoEncoder, AutoEncoderConfig
from comfyui_krea.model_loader.autoencoder.random_weights import write_random_autoencoder_checkpoint
from comfyui_krea.model_loader.text_encoders import CLIP_L, T5EncoderConfig
from comfyui_krea.model_loader.text_encoders.clip import CLIPTextConfig, build_clip
from comfyui_krea.model_loader.text_encoders.random_weights import (
    write_random_clip_checkpoint,
    write_random_t5_checkpoint,
)
from comfyui_krea.nodes.host.holding import ModelSlot
from reference_tokenizers import TOKENIZERS, needs_tokenizers

# Every size different, so no two fields can be swapped unseen.
SMALL_T5 = T5EncoderConfig(vocab_size=40, d_model=16, d_kv=6, heads=3, d_ff=20, layers=2, relative_buckets=8)
SMALL_CLIP = CLIPTextConfig(vocab_size=50, width=64, layers=2, intermediate=32, positions=77)


def meta_shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoders")
    with torch.device("meta"):
        clip_shapes, ae_shapes = meta_shapes(build_clip(CLIP_L)), meta_shapes(AutoEncoder(FLUX_AUTOENCODER))
    return {
        "clip_l": write_zero_checkpoint(folder / "clip_l.safetensors", clip_shapes),  # full size, sparse zeros
        "ae": write_zero_checkpoint(folder / "ae.safetensors", ae_shapes),
        "t5": write_random_t5_checkpoint(folder / "t5.safetensors", SMALL_T5, seed=1),
        "small_clip": write_random_clip_checkpoint(folder / "small_clip.safetensors", SMALL_CLIP, seed=2),
        "small_ae": write_random_autoencoder_checkpoint(folder / "small_ae.safetensors", AutoEncoderConfig(
            ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, norm_groups=8), seed=3),
    }


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    yield from adapter_over_stand_ins(monkeypatch, tmp_path)


def test_the_text_encoders_are_comfyuis_flux_clip_of_the_files_tensors_with_512_t5_tokens(comfy, files):
    clip = comfy.host.ComfyHost().text_encoder_model(files["clip_l"], files["t5"], ModelSlot())
    assert isinstance(clip, comfy.stand_ins["comfy.sd"].CLIP)
    assert isinstance(clip.cond_stage_model, comfy.stand_ins["comfy.text_encoders.flux"].FluxClipModel)
    assert clip.tokenizer_options == {"t5xxl_min_length": 512}  # ComfyUI pads FLUX's T5 to 256 otherwise
    (asked,) = comfy.calls.text_encoders
    assert asked["clip_type"] is comfy.stand_ins["comfy.sd"].CLIPType.FLUX
    assert asked["embedding_directory"] == [str(comfy.root / "models" / "embeddings")]
    clip_tensors, t5_tensors = asked["state_dicts"]
    assert "text_model.encoder.layers.11.mlp.fc2.weight" in clip_tensors
    assert t5_tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"].shape == (16, 20)
    # ComfyUI's T5 config's names (comfy/text_encoders/t5_config_xxl.json), sized as the file is
    assert asked["model_options"] == {"t5xxl_model_config": {
        "d_model": 16, "d_kv": 6, "num_heads": 3, "d_ff": 20, "num_layers": 2, "vocab_size": 40,
        "relative_attention_num_buckets": 8}}


def test_the_slot_keeps_the_text_encoders_until_another_file_is_picked(comfy, files, tmp_path):
    host, slot = comfy.host.ComfyHost(), ModelSlot()
    first = host.text_encoder_model(files["clip_l"], files["t5"], slot)
    assert host.text_encoder_model(files["clip_l"], files["t5"], slot) is first
    other_t5 = shutil.copy(files["t5"], tmp_path / "t5_copy.safetensors")
    assert host.text_encoder_model(files["clip_l"], other_t5, slot) is not first
    assert len(comfy.calls.text_encoders) == 2


def test_a_clip_of_another_size_is_refused_before_anything_is_built(comfy, files):
    with pytest.raises(ModelFileError, match=r"small_clip.safetensors is a CLIP text encoder of another size \(2 "
                                             r"layers of width 64\).*pick clip_l.safetensors"):
        comfy.host.ComfyHost().text_encoder_model(files["small_clip"], files["t5"], ModelSlot())
    assert comfy.calls.text_encoders == []


def test_a_t5_file_that_is_no_t5_is_refused_by_its_path(comfy, files):
    with pytest.raises(ModelFileError, match="small_ae.safetensors"):
        comfy.host.ComfyHost().text_encoder_model(files["clip_l"], files["small_ae"], ModelSlot())
    assert comfy.calls.text_encoders == []


def test_the_vae_is_comfyuis_own_of_the_files_tensors_kept_in_the_slot(comfy, files):
    host, slot = comfy.host.ComfyHost(), ModelSlot()
    vae = host.vae_model(files["ae"], slot)
    assert isinstance(vae, comfy.stand_ins["comfy.sd"].VAE) and vae.latent_channels == 16
    assert vae.first_stage_model["decoder.conv_in.weight"].shape == (512, 16, 3, 3)
    assert host.vae_model(files["ae"], slot) is vae


def test_an_autoencoder_of_another_size_is_refused_by_its_path(comfy, files):
    slot = ModelSlot()
    with pytest.raises(ModelFileError, match=r"small_ae.safetensors is an autoencoder of another size .*"
                                             r"FLUX's is ae.safetensors \(widths \(128, 256, 512, 512\)\)"):
        comfy.host.ComfyHost().vae_model(files["small_ae"], slot)
    assert slot.model is None


def flux_clip(comfy, files):
    return comfy.models.flux_clip(files["clip_l"], files["t5"])


@pytest.mark.parametrize("kind", ["sd1", "str"])
def test_text_encoders_of_another_family_are_refused_by_name(comfy, files, kind):
    sd = comfy.stand_ins["comfy.sd"]
    clip = sd.load_text_encoder_state_dicts([], clip_type=sd.CLIPType.STABLE_DIFFUSION) if kind == "sd1" else "clip"
    name = "SD1ClipModel" if kind == "sd1" else "str"
    with pytest.raises(ValueError, match=f"^text_encoder must hold FLUX's text encoders .* DualCLIPLoader with type "
                                         f"flux. The connected one is {name}.$"):
        comfy.models.encode_prompt(clip, "a cat", (None, None))  # refused before any tokenizer runs
    assert comfy.calls.encoded == []


def test_a_flux_clip_object_without_comfyuis_flux_encoders_is_refused(comfy):
    clip = comfy.stand_ins["comfy.sd"].CLIP(None)
    with pytest.raises(ValueError, match="The connected one is CLIP.$"):
        comfy.models.flux_clip_input(clip)
    holder = type("Holder", (), {"cond_stage_model": comfy.stand_ins["comfy.text_encoders.flux"].FluxClipModel()})()
    with pytest.raises(ValueError, match="The connected one is FluxClipModel.$"):  # not ComfyUI's CLIP
        comfy.models.flux_clip_input(holder)


@needs_tokenizers
def test_the_prompt_reaches_comfyuis_encoder_as_the_packs_token_ids(comfy, files):
    shutil.copytree(TOKENIZERS / "clip", comfy.root / "comfy" / "sd1_tokenizer")
    shutil.copytree(TOKENIZERS / "t5", comfy.root / "comfy" / "text_encoders" / "t5_tokenizer")
    clip = flux_clip(comfy, files)
    conditioning = comfy.host.ComfyHost().encode_prompt(clip, "a red fox (in snow:1.4)")
    assert conditioning[0][0].shape == (1, 512, 4)  # what ComfyUI's encoder gave, handed on
    (tokens,) = comfy.calls.encoded
    assert set(tokens) == {"l", "t5xxl"}
    (clip_ids,), (t5_ids,) = tokens["l"], tokens["t5xxl"]
    assert len(clip_ids) == 77 and len(t5_ids) == 512
    assert {weight for _, weight in clip_ids + t5_ids} == {1.0}  # the text taken literally: no (word:1.4)
    assert all(type(i) is int for i, _ in clip_ids + t5_ids)
    t5 = Tokenizer.from_file(str(TOKENIZERS / "t5" / "tokenizer.json")).encode("a red fox (in snow:1.4)").ids
    assert [i for i, _ in t5_ids[:len(t5)]] == t5 and {i for i, _ in t5_ids[len(t5):]} == {0}
    assert clip_ids[0][0] == 49406 and 49407 in [i for i, _ in clip_ids]  # CLIP's start and end tokens


def vae_of(comfy, latent_channels: int, latent_dim: int, upscale_ratio: int):
    return comfy.stand_ins["comfy.sd"].VAE.of(latent_channels, latent_dim, upscale_ratio)


def test_images_go_to_comfyuis_vae_and_decoded_images_come_back_on_the_cpu_in_float32(comfy, files):
    host = comfy.host.ComfyHost()
    vae = comfy.models.flux_vae(files["ae"])
    images = torch.rand(1, 32, 48, 3)
    latents = host.encode_pixels(vae, images)
    assert latents.shape == (1, 16, 4, 6) and comfy.calls.vae_calls[0][1] is images
    decoded = host.decode_latents(vae, latents)
    assert comfy.calls.vae_calls[1][1] is latents
    assert decoded.shape == (1, 32, 48, 3) and decoded.dtype == torch.float32 and decoded.device.type == "cpu"
    assert decoded.is_contiguous() and torch.all(decoded == 0.25)


@pytest.mark.parametrize("vae, what", [
    ((4, 2, 8), "a VAE with 4 latent channels"),  # SD and SDXL
    ((16, 3, 8), "a VAE with 16 latent channels"),  # a video VAE (Wan 2.1: 16 channels, 3-D latents)
    ((16, 2, 16), "a VAE with 16 latent channels"),  # another compression
    (None, "str"),
])
def test_vaes_of_other_models_are_refused_before_they_run(comfy, vae, what):
    given = vae_of(comfy, *vae) if vae is not None else "vae"
    host = comfy.host.ComfyHost()
    for call in (lambda: host.encode_pixels(given, torch.rand(1, 16, 16, 3)),
                 lambda: host.decode_latents(given, torch.zeros(1, 16, 2, 2))):
        with pytest.raises(ValueError, match=f"^vae must be FLUX's autoencoder \\(16 latent channels\\): .* "
                                             f"The connected one is {what}.$"):
            call()
    assert comfy.calls.vae_calls == []
