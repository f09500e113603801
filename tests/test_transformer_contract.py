"""The transformer's two entry points: the reference `forward_orig` on packed tokens, and ComfyUI's
diffusion-model `forward` on (B, C, H, W) latents that native samplers call (odd sides wrapped around as ComfyUI
does, the inputs ComfyUI passes as None, position ids on the latents' device); what it refuses by name; and what it
says about itself (compute dtype, the sizes ComfyUI's FLUX exposes, every layer built where and as asked)."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from comfyui_krea.model_loader.checkpoints import StateDictSource
from comfyui_krea.model_loader.flux import (
    FluxTransformer,
    load_flux,
    load_flux_from_source,
    write_random_flux_checkpoint,
)
from comfyui_krea.model_loader.flux.math import image_ids, pack, text_ids, unpack
from conftest import TINY_FLUX, flux_inputs, random_flux


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


# ------------------------------------------------------------- ComfyUI's forward, on the inputs ComfyUI gives

def comfy_inputs(h: int, w: int):
    gen = torch.Generator().manual_seed(12)
    return (torch.randn(1, 16, h, w, generator=gen), torch.tensor([0.5]), torch.randn(1, 3, 32, generator=gen),
            torch.randn(1, 16, generator=gen), torch.tensor([3.0]))


def test_comfy_forward_takes_inputs_comfyui_passes_as_none():
    # ComfyUI's FLUX callers pass extra keyword inputs set to None (ref_latents, attention_mask): no refusal.
    model = FluxTransformer(TINY_FLUX).eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        x, context = torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 3, 32, generator=gen)
        y, t, g = torch.randn(1, 16, generator=gen), torch.tensor([0.5]), torch.tensor([3.0])
        plain = model(x, t, context, y=y, guidance=g)
        assert torch.equal(model(x, t, context, y=y, guidance=g, ref_latents=None, attention_mask=None), plain)


@pytest.mark.parametrize("h,w", [(5, 4), (4, 3), (5, 3)])
def test_comfy_forward_wraps_odd_sides_around_like_comfyui(h, w):
    # ComfyUI's FLUX pads an odd latent side by wrapping (circular): the first row / column repeated after the
    # last; the output is cropped back. Written out here with cat, then run through the reference call.
    model = random_flux()
    x, t, context, y, g = comfy_inputs(h, w)
    padded = torch.cat([x, x[:, :, :1]], dim=2) if h % 2 else x
    padded = torch.cat([padded, padded[:, :, :, :1]], dim=3) if w % 2 else padded
    lh, lw = padded.shape[-2:]
    with torch.no_grad():
        out = model(x, t, context, y=y, guidance=g)
        tokens = model.forward_orig(pack(padded), image_ids(1, lh, lw), context,
                                    text_ids(1, 3), t, y, g)
    assert out.shape == x.shape
    assert torch.equal(out, unpack(tokens, lh, lw)[:, :, :h, :w])


def test_comfy_forward_builds_position_ids_on_the_latents_device():
    # On the meta device nothing is computed; ids left on the CPU would fail next to meta tensors.
    model = FluxTransformer(TINY_FLUX, device="meta")
    meta = dict(device="meta")
    out = model(torch.empty(1, 16, 4, 6, **meta), torch.empty(1, **meta), torch.empty(1, 3, 32, **meta),
                y=torch.empty(1, 16, **meta), guidance=torch.empty(1, **meta))
    assert out.shape == (1, 16, 4, 6) and out.device.type == "meta"


def test_comfy_forward_refuses_an_attention_mask_as_a_mask():
    model = random_flux()
    x, t, context, y, g = comfy_inputs(4, 4)
    with pytest.raises(NotImplementedError, match="takes no attention mask"):
        model(x, t, context, y=y, guidance=g, attention_mask=torch.ones(1, 7, 7, dtype=torch.bool))


def test_block_patches_of_comfyuis_flux_are_refused():
    model = random_flux()
    x, t, context, y, g = comfy_inputs(4, 4)
    with pytest.raises(NotImplementedError, match="block patches"):
        model(x, t, context, y=y, guidance=g, transformer_options={"patches": {"double_block": [print]}})


# ----------------------------------------------------------------------------------------- the reference call

def test_reference_call_computes_in_the_image_tokens_dtype():
    # The image tokens set the compute dtype: float32 text and pooled vectors are cast to it first.
    model = load_flux_from_source(StateDictSource(random_flux().state_dict()))
    x = flux_inputs(TINY_FLUX, batch=1)
    with torch.no_grad():
        cast = model.forward_orig(**{**x, "img": x["img"].bfloat16(), "txt": x["txt"].bfloat16(),
                                     "y": x["y"].bfloat16()})
        mixed = model.forward_orig(**{**x, "img": x["img"].bfloat16()})
    assert cast.dtype == mixed.dtype == torch.bfloat16
    assert torch.equal(mixed, cast)


@pytest.mark.parametrize("img_shape,txt_shape", [((1, 6, 64), (4, 32)), ((6, 64), (1, 4, 32))])
def test_reference_call_refuses_unbatched_tokens(img_shape, txt_shape):
    model = random_flux()
    x = flux_inputs(TINY_FLUX, batch=1)
    with pytest.raises(ValueError, match=r"must be \(B, L, C\)"):
        model.forward_orig(**{**x, "img": torch.zeros(img_shape), "txt": torch.zeros(txt_shape)})


# --------------------------------------------------------------------------- what the model says about itself

@pytest.mark.parametrize("dtype, compute", [(None, torch.float32), (torch.float16, torch.float16),
                                            (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                            (torch.float8_e4m3fn, torch.bfloat16)])
def test_the_transformer_says_what_it_computes_in_and_its_sizes(dtype, compute):
    """compute_dtype (fp8 storage computes in bf16), and the sizes ComfyUI's FLUX exposes on its
    diffusion_model (in/out channels, hidden size, heads), which code written for ComfyUI reads."""
    model = FluxTransformer(TINY_FLUX, dtype=dtype, device="meta")
    assert model.compute_dtype == compute
    assert (model.in_channels, model.out_channels, model.hidden_size, model.num_heads) == \
        (TINY_FLUX.in_channels, TINY_FLUX.out_channels, TINY_FLUX.hidden_size, TINY_FLUX.num_heads)


def test_every_layer_is_built_where_and_as_asked():
    """Loading builds the model on the meta device (no memory until the weights are assigned): every parameter
    must land there, in the dtype asked for; and the norms are FLUX's (no affine, eps 1e-6, not torch's 1e-5)."""
    model = FluxTransformer(TINY_FLUX, dtype=torch.float16, device="meta")
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float16)}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(n.eps == 1e-6 and n.weight is None for n in norms)
    assert all(layer.bias is not None for block in model.single_blocks for layer in (block.linear1, block.linear2))
