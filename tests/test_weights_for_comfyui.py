"""What another implementation of the text encoders and the VAE is given (ComfyUI's own, inside ComfyUI):
`clip_weights`, `t5_weights` and `autoencoder_weights` name every layout the pack reads as the released files do
(clip_l.safetensors, t5xxl_fp16.safetensors as transformers' T5EncoderModel, BFL's ae.safetensors), hand over the
tensors the pack itself loads, keep what a scaled-fp8 file stores beside its weights, and refuse an incomplete file."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.autoencoder import autoencoder_weights, write_random_autoencoder_checkpoint
from comfyui_krea.model_loader.text_encoders import (
    clip_weights,
    load_clip_model,
    load_t5_model,
    t5_weights,
    write_random_clip_checkpoint,
    write_random_t5_checkpoint,
)
from conftest import TINY_AUTOENCODER, TINY_CLIP, TINY_T5


@pytest.mark.parametrize("layout", ["hf", "transformers", "diffusers"])
def test_clip_weights_are_named_as_clip_l_in_every_layout(layout, tmp_path):
    path = write_random_clip_checkpoint(tmp_path / ("text_encoder" if layout == "diffusers" else "clip.safetensors"),
                                        TINY_CLIP, seed=4, layout=layout)
    config, tensors = clip_weights(path)
    loaded = load_clip_model(path).state_dict()
    assert config == TINY_CLIP
    assert set(tensors) - {"text_projection.weight"} == set(loaded)  # text_model.* as in clip_l.safetensors
    assert ("text_projection.weight" in tensors) == (layout == "hf")  # handed over when the file has it
    assert all(torch.equal(tensors[name], loaded[name]) for name in loaded)


@pytest.mark.parametrize("layout", ["hf", "transformers", "diffusers", "comfy_fp8_scaled"])
def test_t5_weights_load_into_transformers_t5_encoder_in_every_layout(layout, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_random_t5_checkpoint(tmp_path / ("text_encoder_2" if layout == "diffusers" else "t5.safetensors"),
                                      TINY_T5, seed=5, layout=layout)
    config, tensors = t5_weights(path)
    assert config == TINY_T5
    reference = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, num_heads=config.heads,
        d_ff=config.d_ff, num_layers=config.layers, feed_forward_proj="gated-gelu"))
    expected = set(reference.state_dict())
    assert expected - set(tensors) <= {"encoder.embed_tokens.weight"}  # tied to shared.weight
    if layout == "comfy_fp8_scaled":  # kept as stored: ComfyUI's scaled-fp8 layers read them
        assert tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float8_e4m3fn
        assert "encoder.block.0.layer.0.SelfAttention.q.scale_weight" in tensors and "scaled_fp8" in tensors
    else:
        loaded = load_t5_model(path).state_dict()
        assert set(tensors) - {"encoder.embed_tokens.weight"} == set(loaded)
        assert all(torch.equal(tensors[name], loaded[name]) for name in loaded)


def test_autoencoder_weights_are_bfl_names_from_both_layouts(tmp_path):
    bfl = write_random_autoencoder_checkpoint(tmp_path / "ae.safetensors", TINY_AUTOENCODER, seed=6)
    diffusers = write_random_autoencoder_checkpoint(tmp_path / "vae", TINY_AUTOENCODER, seed=6, layout="diffusers")
    config, from_bfl = autoencoder_weights(bfl)
    other, from_diffusers = autoencoder_weights(diffusers)
    assert config == other == TINY_AUTOENCODER
    assert set(from_bfl) == set(load_file(bfl)) == set(from_diffusers)
    assert all(torch.equal(from_bfl[k], from_diffusers[k]) for k in from_bfl)


def test_an_incomplete_file_is_refused(tmp_path):
    path = write_random_t5_checkpoint(tmp_path / "t5.safetensors", TINY_T5, seed=5)
    state = load_file(path)
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ModelFileError, match="lacks 1 of the"):
        t5_weights(tmp_path / "cut.safetensors")
