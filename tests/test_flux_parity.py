"""Our FLUX transformer against diffusers' FluxTransformer2DModel on the same weights (float32).

Weights are written once in the BFL layout (loaded by our model with no remapping) and once in the
diffusers layout (loaded strictly by diffusers' own model), from the same random numbers. A mistake in
either the architecture or the BFL <-> diffusers mapping shows up as a parity failure.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from comfyui_krea.model_loader.flux import FluxConfig, load_flux, write_random_flux_checkpoint
from conftest import TINY_FLUX, rel_err


def diffusers_model(config: FluxConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
        num_single_layers=config.depth_single_blocks, attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads, joint_attention_dim=config.context_in_dim,
        pooled_projection_dim=config.vec_in_dim, guidance_embeds=config.guidance_embed,
        axes_dims_rope=config.axes_dim,
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_parity")
    ours = load_flux(write_random_flux_checkpoint(folder / "bfl.safetensors", TINY_FLUX, seed=3))
    theirs = diffusers_model(TINY_FLUX)
    diffusers_file = write_random_flux_checkpoint(folder / "diffusers.safetensors", TINY_FLUX, seed=3,
                                                  layout="diffusers")
    theirs.load_state_dict(load_file(diffusers_file), strict=True)
    return ours, theirs


def make_inputs(batch: int, h: int, w: int, txt_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, h * w, TINY_FLUX.in_channels, generator=gen)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.reshape(1, h * w, 3).expand(batch, -1, -1)
    txt = torch.randn(batch, txt_len, TINY_FLUX.context_in_dim, generator=gen)
    txt_ids = torch.zeros(batch, txt_len, 3)
    y = torch.randn(batch, TINY_FLUX.vec_in_dim, generator=gen)
    return img, img_ids, txt, txt_ids, y


def run_diffusers(model, img, img_ids, txt, txt_ids, t, y, guidance):
    with torch.no_grad():
        return model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                     img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False)[0]


@pytest.mark.parametrize("h,w", [(4, 4), (3, 5)])
def test_matches_diffusers(models, h, w):
    ours, theirs = models
    img, img_ids, txt, txt_ids, y = make_inputs(2, h, w, txt_len=7, seed=h * 10 + w)
    for t, g in [((1.0, 0.75), (4.5, 1.0)), ((0.5, 0.05), (3.5, 10.0)), ((0.01, 0.3), (1.0, 4.5))]:
        t, g = torch.tensor(t), torch.tensor(g)
        with torch.no_grad():
            out = ours.forward_orig(img, img_ids, txt, txt_ids, t, y, g)
        ref = run_diffusers(theirs, img, img_ids, txt, txt_ids, t, y, g)
        assert out.shape == (2, h * w, TINY_FLUX.out_channels)
        assert rel_err(out, ref) < 1e-4, (h, w, t, g)
        # The inputs matter (so the comparison is not between two constant outputs).
        assert rel_err(out, run_diffusers(theirs, img, img_ids, txt, txt_ids, t.flip(0), y, g)) > 1e-3


def test_stepwise_api_equals_forward(models):
    """embed -> blocks -> final, as a step cache runs them, gives the forward result."""
    ours, _ = models
    img, img_ids, txt, txt_ids, y = make_inputs(2, 3, 4, txt_len=5, seed=0)
    t, g = torch.tensor([0.6, 0.2]), torch.tensor([4.5, 2.0])
    with torch.no_grad():
        x, c, vec, pe = ours.embed(img, img_ids, txt, txt_ids, t, y, g)
        assert pe.dtype == torch.float32 and pe.shape == (2, 1, 5 + 12, TINY_FLUX.head_dim // 2, 2, 2)
        for block in ours.double_blocks:
            x, c = block(x, c, vec, pe)
        joint = torch.cat((c, x), dim=1)
        for block in ours.single_blocks:
            joint = block(joint, vec, pe)
        stepwise = ours.final(joint[:, c.shape[1]:], vec)
        assert torch.equal(stepwise, ours.forward_orig(img, img_ids, txt, txt_ids, t, y, g))
        # run_blocks after the first double block ran separately (the step cache's split).
        x, c, vec, pe = ours.embed(img, img_ids, txt, txt_ids, t, y, g)
        x, c = ours.double_blocks[0](img=x, txt=c, vec=vec, pe=pe)
        assert torch.equal(ours.final(ours.run_blocks(x, c, vec, pe, first_double_block=1), vec), stepwise)


def test_final_layer_scale_shift_order_is_checked(models):
    """diffusers' norm_out stores (scale, shift), BFL (shift, scale): loading it unswapped must break parity."""
    ours, theirs = models
    img, img_ids, txt, txt_ids, y = make_inputs(2, 4, 4, txt_len=7, seed=5)
    t, g = torch.tensor([0.5, 0.9]), torch.tensor([4.5, 3.0])
    with torch.no_grad():
        out = ours.forward_orig(img, img_ids, txt, txt_ids, t, y, g)
        swapped = diffusers_model(TINY_FLUX)
        state = {k: v.clone() for k, v in theirs.state_dict().items()}
        for k in ("norm_out.linear.weight", "norm_out.linear.bias"):
            state[k] = torch.cat(state[k].chunk(2, dim=0)[::-1])
        swapped.load_state_dict(state)
    assert rel_err(out, run_diffusers(swapped, img, img_ids, txt, txt_ids, t, y, g)) > 1e-2


def test_bf16_inputs_compute_in_bf16(models):
    ours, _ = models
    img, img_ids, txt, txt_ids, y = make_inputs(1, 2, 2, txt_len=3, seed=1)
    with torch.no_grad():
        out = ours.forward_orig(img.bfloat16(), img_ids, txt.bfloat16(), txt_ids, torch.tensor([0.5]), y.bfloat16(),
                                torch.tensor([4.0]))
        ref = ours.forward_orig(img, img_ids, txt, txt_ids, torch.tensor([0.5]), y, torch.tensor([4.0]))
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 3e-2
