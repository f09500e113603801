"""FLUX files of each layout: diffusers' own model's weights load to the same function (with or without q/k/v
biases, single blocks, guidance), BFL, ComfyUI and scaled fp8 files are told apart (markers and activation scales
skipped), the config is read off the shapes, and what does not fit a layout is refused with the file named."""
from __future__ import annotations

import pytest
import torch

from comfyui_krea.model_loader import ModelFileError, operations
from comfyui_krea.model_loader.checkpoints import StateDictSource
from comfyui_krea.model_loader.flux import FluxConfig, FluxTransformer, layouts, load_flux_from_source
from conftest import TINY_FLUX, flux_inputs, flux_shapes, random_flux, rel_err

# ----------------------------------------------------------------------- the diffusers layout, from diffusers

def diffusers_flux(config, seed: int):
    """diffusers' own FluxTransformer2DModel of `config`, every parameter drawn at random (seeded)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
        num_single_layers=config.depth_single_blocks, attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads, joint_attention_dim=config.context_in_dim,
        pooled_projection_dim=config.vec_in_dim, guidance_embeds=config.guidance_embed,
        axes_dims_rope=config.axes_dim).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def diffusers_output(model, x):
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                     guidance=x["guidance"] if model.config.guidance_embeds else None, return_dict=False)[0]


def ours_from_state(state):
    model = load_flux_from_source(StateDictSource(state))
    with torch.no_grad():
        return model, model.forward_orig(**flux_inputs(model.config))


@pytest.fixture(scope="module")
def diffusers_tiny():
    model = diffusers_flux(TINY_FLUX, seed=9)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_diffusers_weights_drawn_by_diffusers_load_to_the_same_function(diffusers_tiny):
    reference, state = diffusers_tiny
    assert layouts.plan_flux_layout(StateDictSource(state), "f").kind == "diffusers"
    model, out = ours_from_state(state)
    assert model.config == TINY_FLUX
    assert rel_err(out, diffusers_output(reference, flux_inputs(TINY_FLUX))) < 1e-5
    # the final layer's (shift, scale) are diffusers' norm_out (scale, shift) with the halves exchanged
    w = state["norm_out.linear.weight"]
    assert torch.equal(model.final_layer.adaLN_modulation[1].weight, torch.cat([w[32:], w[:32]]))


def test_diffusers_file_without_attention_bias(diffusers_tiny):
    """Some exports drop the q/k/v biases of the double blocks (qkv_bias=False); zero biases are the same model."""
    _, state = diffusers_tiny
    reference = diffusers_flux(TINY_FLUX, seed=9)  # the same weights; the fixture's model stays untouched
    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    dropped = {k for k in state if k.startswith("transformer_blocks.") and k.split(".")[-2] in names
               and k.endswith(".bias")}
    assert len(dropped) == 2 * 6
    with torch.no_grad():
        for k in dropped:
            reference.get_parameter(k).zero_()
    model, out = ours_from_state({k: v for k, v in state.items() if k not in dropped})
    assert model.config.qkv_bias is False and model.double_blocks[0].img_attn.qkv.bias is None
    assert model.single_blocks[0].linear1.bias is not None  # the single blocks keep theirs
    assert rel_err(out, diffusers_output(reference, flux_inputs(TINY_FLUX))) < 1e-5


def test_diffusers_file_with_double_blocks_only():
    config = FluxConfig(**{**TINY_FLUX.__dict__, "depth_single_blocks": 0, "guidance_embed": False})
    reference = diffusers_flux(config, seed=6)
    model, out = ours_from_state({k: v.detach().clone() for k, v in reference.state_dict().items()})
    assert model.config == config and len(model.single_blocks) == 0
    assert rel_err(out, diffusers_output(reference, flux_inputs(config))) < 1e-5


def test_a_diffusers_transformer_with_one_double_block_and_no_qkv_bias_loads(tmp_path):
    import dataclasses

    from comfyui_krea.model_loader.flux import load_flux
    from comfyui_krea.model_loader.flux.random_weights import write_random_flux_checkpoint

    config = dataclasses.replace(TINY_FLUX, depth=1, qkv_bias=False)
    model = load_flux(write_random_flux_checkpoint(tmp_path / "t.safetensors", config, layout="diffusers"))
    assert model.config.depth == 1 and model.config.qkv_bias is False


def test_diffusers_plan_reports_the_files_dtype_and_fused_shapes(diffusers_tiny):
    _, state = diffusers_tiny
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    plan = layouts.plan_flux_layout(StateDictSource(state), "f").tensors
    assert {t.dtype for t in plan.values()} == {torch.bfloat16}
    qkv = plan["double_blocks.1.txt_attn.qkv.weight"]
    assert qkv.shape == (96, 32)
    parts = [state[f"transformer_blocks.1.attn.add_{x}_proj.weight"] for x in "qkv"]
    assert torch.equal(qkv.read(), torch.cat(parts))
    linear1 = plan["single_blocks.0.linear1.bias"]
    assert linear1.shape == (3 * 32 + 128,)
    assert torch.equal(linear1.read(), torch.cat([state[f"single_transformer_blocks.0.{p}.bias"]
                                                  for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_diffusers_file_with_missing_or_extra_tensors(diffusers_tiny, change):
    _, state = diffusers_tiny
    state = dict(state)
    if change == "missing":
        del state["single_transformer_blocks.1.proj_mlp.bias"]
    else:
        state["transformer_blocks.1.attn.to_q.lora.weight"] = torch.zeros(2, 2)
    with pytest.raises(ModelFileError, match={"missing": "missing 1 tensors", "extra": "holds 1 tensors"}[change]):
        layouts.plan_flux_layout(StateDictSource(state), "my.safetensors")


def test_diffusers_tensors_that_do_not_fit_together(diffusers_tiny):
    _, state = diffusers_tiny
    state = dict(state, **{"transformer_blocks.0.attn.to_k.weight": torch.zeros(32, 31)})
    with pytest.raises(ModelFileError, match="do not fit together"):
        layouts.plan_flux_layout(StateDictSource(state), "my.safetensors")


def test_a_diffusers_layout_error_names_the_file(tmp_path):
    from safetensors.torch import load_file

    from comfyui_krea.model_loader.flux.random_weights import write_random_flux_checkpoint

    diffusers = load_file(write_random_flux_checkpoint(tmp_path / "d.safetensors", TINY_FLUX, layout="diffusers"))
    diffusers.pop(sorted(diffusers)[0])
    with pytest.raises(ModelFileError, match=r"^my_diffusers\.safetensors \(diffusers layout\) is missing"):
        layouts.plan_flux_layout(StateDictSource(diffusers), "my_diffusers.safetensors")


# -------------------------------------------------------------------------------------- BFL / ComfyUI layouts

@pytest.fixture(scope="module")
def bfl_state():
    return {k: v.detach().clone() for k, v in random_flux(seed=21).state_dict().items()}


def test_layout_names_of_bfl_comfy_and_scaled_fp8_files(bfl_state):
    from comfyui_krea.model_loader.flux.layouts import COMFY_PREFIX

    assert layouts.plan_flux_layout(StateDictSource(bfl_state), "f").kind == "bfl"
    comfy = {COMFY_PREFIX + k: v for k, v in bfl_state.items()}
    assert layouts.plan_flux_layout(StateDictSource(comfy), "f").kind == "comfy"
    key = COMFY_PREFIX + "single_blocks.0.linear2.weight"
    q, scale = operations.quantize_fp8(comfy[key])
    scaled = {**comfy, key: q, key.replace(".weight", ".scale_weight"): scale}
    assert layouts.plan_flux_layout(StateDictSource(scaled), "f").kind == "comfy_fp8_scaled"


def test_scaled_fp8_markers_and_activation_scales_are_skipped_wherever_they_are(bfl_state):
    from comfyui_krea.model_loader.flux.layouts import COMFY_PREFIX

    key = "double_blocks.0.img_mlp.2.weight"
    q, scale = operations.quantize_fp8(bfl_state[key])
    # ComfyUI's scaled files: a `scaled_fp8` marker and `.scale_input` activation scales, here written first.
    state = {COMFY_PREFIX + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
             COMFY_PREFIX + key.replace(".weight", ".scale_input"): torch.tensor(1.0)}
    state.update({COMFY_PREFIX + k: v for k, v in bfl_state.items()})
    state[COMFY_PREFIX + key] = q
    state[COMFY_PREFIX + key.replace(".weight", ".scale_weight")] = scale
    layout = layouts.plan_flux_layout(StateDictSource(state), "f")
    assert set(layout.tensors) == set(bfl_state)
    assert layout.tensors[key].scale is not None and layout.tensors[key.replace(".weight", ".bias")].scale is None
    model = load_flux_from_source(StateDictSource(state))
    assert torch.equal(model.double_blocks[0].img_mlp[2].weight.float(), q.float())


def test_comfy_file_with_unknown_tensors_outside_the_transformer_is_refused(bfl_state):
    from comfyui_krea.model_loader.flux.layouts import COMFY_PREFIX

    state = {COMFY_PREFIX + k: v for k, v in bfl_state.items()}
    state["model.some_adapter.weight"] = torch.zeros(2)
    with pytest.raises(ModelFileError, match=r"^my_flux\.safetensors holds tensors outside the FLUX transformer"):
        layouts.plan_flux_layout(StateDictSource(state), "my_flux.safetensors")  # the message names the file


def test_an_fp8_scale_without_its_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from comfyui_krea.model_loader.checkpoints import open_checkpoint
    from comfyui_krea.model_loader.flux import write_random_flux_checkpoint

    path = write_random_flux_checkpoint(tmp_path / "scaled.safetensors", TINY_FLUX, layout="comfy_fp8_scaled")
    state = load_file(path)
    state["model.diffusion_model.double_blocks.0.img_mod.extra.scale_weight"] = torch.tensor(1.0)
    save_file(state, tmp_path / "orphan.safetensors")
    with pytest.raises(ModelFileError, match="fp8 scales without weights"):
        layouts.plan_flux_layout(open_checkpoint(tmp_path / "orphan.safetensors"), "orphan.safetensors")


# ---------------------------------------------------------------------------- the config, read off the shapes

def test_flux_config_other_than_the_defaults_is_read_off_the_shapes():
    from comfyui_krea.model_loader.flux import config_from_checkpoint

    config = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=24, hidden_size=32,
                        mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6),
                        qkv_bias=False, guidance_embed=False)
    with torch.device("meta"):
        state = FluxTransformer(config).state_dict()
    assert config_from_checkpoint(dict(state)) == config


def test_a_transformer_of_single_blocks_only_is_read_off_its_shapes():
    config = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64,
                        mlp_ratio=3.0, num_heads=4, depth=0, depth_single_blocks=2, axes_dim=(4, 6, 6))
    got = layouts.config_from_shapes(flux_shapes(config), "single.safetensors")
    assert (got.hidden_size, got.num_heads, got.mlp_ratio, got.depth, got.depth_single_blocks) == (64, 4, 3.0, 0, 2)


@pytest.mark.parametrize("head_dim", [0, 24])  # none at all; not a divisor of the hidden size 64
def test_an_impossible_head_dim_is_a_model_file_error(head_dim):
    shapes = flux_shapes(TINY_FLUX)
    shapes["double_blocks.0.img_attn.norm.query_norm.scale"] = (head_dim,)
    with pytest.raises(ModelFileError, match=f"not a multiple of the head dim {head_dim}"):
        layouts.config_from_shapes(shapes, "odd.safetensors")


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_a_transformer_without_double_blocks_is_not_taken_for_flux_1(tmp_path, layout):
    from comfyui_krea.model_loader.flux import load_flux, write_random_flux_checkpoint

    config = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64,
                        num_heads=4, depth=0, depth_single_blocks=2, axes_dim=(4, 6, 6))
    path = write_random_flux_checkpoint(tmp_path / "single.safetensors", config, layout=layout)
    with pytest.raises(ModelFileError, match="not a FLUX.1 transformer"):
        load_flux(path)
