"""The transformer's two entry points: the reference `forward_orig` on packed tokens, and ComfyUI's
diffusion-model `forward` on (B, C, H, W) latents that native samplers call; and what it refuses by name."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from comfyui_krea.model_loader.flux import load_flux, write_random_flux_checkpoint
from comfyui_krea.model_loader.flux.math import image_ids, pack, text_ids, unpack
from conftest import TINY_FLUX


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_random_flux_checkpoint(tmp_path_factory.mktemp("flux") / "f.safetensors", TINY_FLUX, seed=5)
    return load_flux(path)


def inputs(b=2, h=6, w=4, tokens=5):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, 16, h, w, generator=gen)
    context = torch.randn(b, tokens, TINY_FLUX.context_in_dim, generator=gen)
    y = torch.randn(b, TINY_FLUX.vec_in_dim, generator=gen)
    return x, torch.tensor([0.7, 0.3][:b]), context, y, torch.full((b,), 4.5)


def test_comfy_forward_is_the_reference_on_packed_tokens(model):
    x, t, context, y, g = inputs()
    with torch.no_grad():
        out = model(x, t, context, y=y, guidance=g, transformer_options={"patches": {}})
        tokens = model.forward_orig(pack(x), image_ids(2, 6, 4), context, text_ids(2, 5), t, y, g)
    assert out.shape == x.shape
    assert torch.equal(out, unpack(tokens, 6, 4))


def test_odd_latent_sizes_are_padded_and_cropped(model):
    x, t, context, y, g = inputs(b=1, h=5, w=3)
    with torch.no_grad():
        out = model(x, t, context, y=y, guidance=g)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("extra, message", [
    ({"control": {"input": [torch.zeros(1)]}}, "ControlNet"),
    ({"transformer_options": {"patches_replace": {"dit": {("double_block", 0): print}}}}, "block patches"),
    ({"transformer_options": {"wrappers": {"diffusion_model": {"x": [print]}}}}, "wrappers"),
    ({"ref_latents": [torch.zeros(1, 16, 2, 2)]}, "ref_latents"),
])
def test_what_only_comfyui_flux_runs_is_refused_by_name(model, extra, message):
    x, t, context, y, g = inputs()
    with pytest.raises(NotImplementedError, match=f"Krea node pack.*{message}"):
        model(x, t, context, y=y, guidance=g, **extra)


def test_a_replaced_forward_orig_is_refused_not_ignored(model):
    # TeaCache-style nodes swap diffusion_model.forward_orig for their own (mock.patch.multiple).
    x, t, context, y, g = inputs()
    with mock.patch.multiple(model, forward_orig=lambda *a, **k: None), \
            pytest.raises(NotImplementedError, match="Krea node pack: a node replaced"):
        model(x, t, context, y=y, guidance=g)
    with torch.no_grad():
        assert model(x, t, context, y=y, guidance=g).shape == x.shape  # restored


def test_the_class_is_not_named_like_comfyuis_flux(model):
    # Nodes that only accept ComfyUI's own FLUX check the class name ("Flux"); they must refuse this one.
    assert type(model).__name__ != "Flux"
