"""The autoencoder as built from a file: a config other than the defaults is read off the shapes, diffusers' key
names (new, then old) are looked up for each layer, the group norms use diffusers' epsilon, and every layer comes
from the operations given (ComfyUI builds models with its own layer classes)."""
from __future__ import annotations

import pytest
import torch

from comfyui_krea.model_loader.autoencoder import AutoEncoder
from conftest import TINY_AUTOENCODER


@pytest.mark.parametrize("layout,ch_mult", [("bfl", (1, 2, 4)), ("diffusers", (1, 2, 4)), ("bfl", (2,))])
def test_vae_config_other_than_the_defaults_is_read_off_the_shapes(layout, ch_mult, tmp_path):
    from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig, load_autoencoder
    from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint as write

    config = AutoEncoderConfig(in_channels=4, out_channels=1, ch=32, ch_mult=ch_mult, num_res_blocks=1,
                               z_channels=16, mid_attention=False)
    path = write(tmp_path / ("ae.safetensors" if layout == "bfl" else "vae"), config, seed=2, layout=layout)
    assert load_autoencoder(path, "cpu").config == config


@pytest.mark.parametrize("layer", ["norm", "q", "proj_out"])
def test_vae_attention_key_names_new_then_old(layer):
    from comfyui_krea.model_loader.autoencoder.layouts import diffusers_key_names

    new = {"norm": "group_norm", "q": "to_q", "proj_out": "to_out.0"}[layer]
    old = {"norm": None, "q": "query", "proj_out": "proj_attn"}[layer]
    want = [f"decoder.mid_block.attentions.0.{new}.bias"] + ([f"decoder.mid_block.attentions.0.{old}.bias"]
                                                             if old else [])
    assert diffusers_key_names(f"decoder.mid.attn_1.{layer}.bias", 4) == want


def test_vae_group_norms_use_diffusers_epsilon():
    from diffusers import AutoencoderKL

    reference = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                              layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                              use_post_quant_conv=False)
    theirs = [(m.num_groups, m.eps, m.affine) for m in reference.modules() if isinstance(m, torch.nn.GroupNorm)]
    # Built here, not taken from a shared fixture: tools/mutation.py (mutmut) runs, for each changed function,
    # only the tests that call it themselves.
    with torch.device("meta"):
        ours = [(m.num_groups, m.eps, m.affine) for m in AutoEncoder(TINY_AUTOENCODER).modules()
                if isinstance(m, torch.nn.GroupNorm)]
    assert sorted(ours) == sorted(theirs) and {eps for _, eps, _ in ours} == {1e-6}


def test_every_vae_layer_comes_from_the_operations_given():
    # ComfyUI builds models with its own layer classes (comfy.ops: weight casting, offloading).
    import types

    from comfyui_krea.model_loader.autoencoder import AutoEncoder

    class Conv(torch.nn.Conv2d):
        pass

    class Norm(torch.nn.GroupNorm):
        pass

    ops = types.SimpleNamespace(Conv2d=Conv, GroupNorm=Norm, Linear=torch.nn.Linear)
    with torch.device("meta"):
        vae = AutoEncoder(TINY_AUTOENCODER, ops)
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert convs and norms
    assert all(type(m) is Conv for m in convs) and all(type(m) is Norm for m in norms)
