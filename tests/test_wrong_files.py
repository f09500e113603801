"""Each loader, handed each other kind of model file, names what the file is (the identifier's verdict) and,
on the node side, the folder where that file belongs and the one its own file goes in."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfyui_krea.model_loader import FileKind, ModelFileError
from comfyui_krea.model_loader.text_encoders import write_random_clip_checkpoint
from comfyui_krea.nodes.handles import (
    SafetyCheckerHandle,
    TextEncoderHandle,
    TransformerHandle,
    VaeHandle,
    forget_loaded,
)
from comfyui_krea.nodes.host import KIND_FOLDERS
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
