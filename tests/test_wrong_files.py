"""Each loader, handed each other kind of model file, names what the file is (the identifier's verdict) and,
on the node side, the folder where that file belongs and the one its own file goes in; the FLUX loader says what
it expected, and the VAE loader names the model a VAE of another latent layout belongs to."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfyui_krea.model_loader import FileKind, ModelFileError
from comfyui_krea.model_loader.checkpoints import StateDictSource
from comfyui_krea.model_loader.flux import layouts
from comfyui_krea.model_loader.text_encoders import write_random_clip_checkpoint
from comfyui_krea.nodes.handles import SafetyCheckerHandle
from comfyui_krea.nodes.host import KIND_FOLDERS, TextEncoderHandle, TransformerHandle, VaeHandle, forget_loaded
from conftest import TINY_CLIP

CPU = torch.device("cpu")
# A few tensor names of each kind, as the real files hold them.
FILES = {
    FileKind.FLUX_TRANSFORMER: ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"],
    FileKind.VAE: ["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"],
    FileKind.CLIP_TEXT: ["text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.mlp.fc1.weight"],
    FileKind.T5_TEXT: ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"],
    FileKind.VIT_CLASSIFIER: ["vit.embeddings.cls_token", "classifier.weight"],
    FileKind.LORA: ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"],
    FileKind.SD_UNET: ["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"],
    FileKind.BUNDLE: ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
}


def write(tmp_path, kind: FileKind):
    path = tmp_path / f"{kind.name.lower()}.safetensors"
    save_file({k: torch.zeros(2, 2) for k in FILES[kind]}, str(path))
    return path


def loaders(tmp_path):
    """(the kind each loader needs, a function loading a given file as that kind through its node handle)."""
    clip = write_random_clip_checkpoint(tmp_path / "clip_l.safetensors", TINY_CLIP)
    return {
        FileKind.FLUX_TRANSFORMER: lambda p: TransformerHandle(p, "default", CPU).load(),
        FileKind.CLIP_TEXT: lambda p: TextEncoderHandle(p, p, None, CPU).load(),
        FileKind.T5_TEXT: lambda p: TextEncoderHandle(clip, p, None, CPU).load(),
        FileKind.VAE: lambda p: VaeHandle(p, CPU).load(),
        FileKind.VIT_CLASSIFIER: lambda p: SafetyCheckerHandle(p, CPU).load(),
    }


@pytest.mark.parametrize("needed", [FileKind.FLUX_TRANSFORMER, FileKind.CLIP_TEXT, FileKind.T5_TEXT, FileKind.VAE,
                                    FileKind.VIT_CLASSIFIER], ids=lambda k: k.name)
def test_each_loader_names_each_other_kind_and_its_folder(tmp_path, needed, host_state):
    load = loaders(tmp_path)[needed]
    for kind in FILES:
        if kind is needed:
            continue
        with pytest.raises(ModelFileError) as err:
            load(write(tmp_path, kind))
        forget_loaded()
        message = str(err.value)
        assert err.value.found is kind and err.value.expected is needed, (kind, message)
        assert kind.description in message, message
        assert f"models/{KIND_FOLDERS[kind]}" in message and f"models/{KIND_FOLDERS[needed]}" in message, message


# ---------------------------------------------------------------------------------- files that are not FLUX's

@pytest.mark.parametrize("keys,found", [
    (["text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.weight"], FileKind.CLIP_TEXT),
    ([f"unknown_{i}.weight" for i in range(7)], FileKind.UNKNOWN),
])
def test_other_files_say_what_they_are_and_what_was_expected(keys, found):
    with pytest.raises(ModelFileError) as err:
        layouts.plan_flux_layout(StateDictSource({k: torch.zeros(1) for k in keys}), "x.safetensors")
    assert err.value.found is found and err.value.expected is FileKind.FLUX_TRANSFORMER
    assert str(err.value).endswith("Use a FLUX.1 transformer file (e.g. flux1-krea-dev.safetensors).")
    if found is FileKind.UNKNOWN:  # a file of no known kind is described by its first five key names
        assert "first keys: " + ", ".join(f"unknown_{i}.weight" for i in range(5)) + ")" in str(err.value)


# --------------------------------------------------------------------------------------- VAEs of other models

def vae_state(config, seed: int = 1):
    from comfyui_krea.model_loader.autoencoder import AutoEncoder

    with torch.device("meta"):
        return dict(AutoEncoder(config).state_dict())


def _vae_error(tmp_path, state):
    from safetensors.torch import save_file

    from comfyui_krea.model_loader.autoencoder import load_autoencoder

    path = tmp_path / "v.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in state.items()}, str(path))
    with pytest.raises(ModelFileError) as err:
        load_autoencoder(path, "cpu")
    return str(err.value)


@pytest.mark.parametrize("extra", ["quant_conv.weight", "post_quant_conv.weight"])
def test_vae_with_quant_conv_layers_is_another_models(tmp_path, extra):
    from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig

    state = vae_state(AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))  # 16 latent channels
    state[extra] = torch.empty(32, 32, 1, 1, device="meta")
    assert "(it has quant_conv layers, which FLUX's autoencoder does not)" in _vae_error(tmp_path, state)


def test_sd_vae_error_names_stable_diffusion(tmp_path):
    from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig

    message = _vae_error(tmp_path, vae_state(AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                                z_channels=4)))
    assert "4 latent channels, not 16 (a Stable Diffusion 1.x/2.x/SDXL VAE)" in message
    message = _vae_error(tmp_path, vae_state(AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                                z_channels=8)))
    assert "8 latent channels, not 16." in message  # no hint for a VAE of no known model
