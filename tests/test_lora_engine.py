"""The LoRA engine's own promises (model_loader/lora): a set is merged once in real units on every weight storage,
put back bit for bit, changed without reading the base file, checked whole before any weight changes; the
adapter kinds' arithmetic; the factors kept for layers that cannot merge; bad files named with their problem."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from comfyui_krea.model_loader.checkpoints import SafetensorsFile
from comfyui_krea.model_loader.errors import ModelFileError
from comfyui_krea.model_loader.flux import FluxConfig, load_flux, write_random_flux_checkpoint
from comfyui_krea.model_loader.lora import (
    LoraChoice,
    applied_loras,
    layer_deltas,
    plan_loras,
    read_lora,
    restore_base,
    set_loras,
)
from comfyui_krea.model_loader.operations import real_weight
from lora_files import write_lora

UNEQUAL = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=32, num_heads=2,
                     depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_engine")
    return {
        "folder": folder,
        "base": write_random_flux_checkpoint(folder / "base.safetensors", UNEQUAL, seed=2),
        "fp8": write_random_flux_checkpoint(folder / "fp8.safetensors", UNEQUAL, seed=2, layout="comfy_fp8_scaled"),
        "kohya": write_lora(folder / "kohya.safetensors", UNEQUAL, "kohya", seed=1),
        "diffusers": write_lora(folder / "diffusers.safetensors", UNEQUAL, "diffusers", seed=2),
        "lokr": write_lora(folder / "lokr.safetensors", UNEQUAL, "lokr", seed=3),
        "loha": write_lora(folder / "loha.safetensors", UNEQUAL, "loha", seed=4),
    }


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weight_dtype", ["default", "bf16", "fp16", "fp8_e4m3fn"])
def test_a_set_is_merged_then_the_base_comes_back_bit_for_bit(files, weight_dtype):
    model = load_flux(files["base"], weight_dtype)
    base = weights(model)
    set_loras(model, [LoraChoice(files["kohya"], 0.9), LoraChoice(files["lokr"], -0.5)])
    merged = weights(model)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert len(changed) > 10 and all(merged[k].dtype == base[k].dtype for k in base)
    set_loras(model, [LoraChoice(files["diffusers"], 1.2)])  # a new set: the base first, then the new one
    restore_base(model)
    assert same(weights(model), base) and applied_loras(model) == ()


def test_changing_the_set_never_reads_the_base_file_and_equals_a_fresh_merge(files, monkeypatch):
    model = load_flux(files["base"])
    set_loras(model, [LoraChoice(files["kohya"], 0.8)])
    read = []
    original_tensor = SafetensorsFile.tensor
    monkeypatch.setattr(SafetensorsFile, "tensor", lambda self, key: read.append(self.path) or original_tensor(self,
                                                                                                               key))
    choice = [LoraChoice(files["diffusers"], 0.6), LoraChoice(files["loha"], 1.0)]
    set_loras(model, choice)
    assert set(read) == {files["diffusers"], files["loha"]}  # LoRA tensors only, no base tensor
    monkeypatch.undo()
    fresh = set_loras(load_flux(files["base"]), choice)
    assert same(weights(model), weights(fresh))


def test_the_same_set_again_does_nothing(files):
    model = load_flux(files["base"])
    set_loras(model, [LoraChoice(files["kohya"], 0.8)])
    before = {k: v for k, v in model.named_parameters()}
    set_loras(model, [LoraChoice(files["kohya"], 0.8)])
    assert all(before[k] is v for k, v in model.named_parameters())  # not even re-merged into new tensors
    set_loras(model, [LoraChoice(files["kohya"], 0.8), LoraChoice(files["diffusers"], 0.0)])  # strength 0: absent
    assert all(before[k] is v for k, v in model.named_parameters())


def test_merged_weights_are_the_base_plus_the_low_rank_factors(files):
    """What layers that cannot merge (quantized weights) get instead: per layer, (up, down, scale) with
    up @ down * scale the same delta the merge adds."""
    model = load_flux(files["base"])
    base = {n: real_weight(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    choices = [LoraChoice(files["kohya"], 0.7), LoraChoice(files["diffusers"], -1.1)]
    deltas = layer_deltas(plan_loras(choices, model.config))
    set_loras(model, choices)
    for layer, items in deltas.items():
        expected = base[layer].clone()
        for d in items:
            up, down, scale = d.low_rank()
            expected[d.row_start:d.row_start + d.rows] += scale * up @ down
        torch.testing.assert_close(real_weight(model.get_submodule(layer)), expected, rtol=0, atol=1e-6)
    assert "final_layer.adaLN_modulation.1" in deltas and "single_blocks.2.linear1" in deltas


def test_on_scaled_fp8_the_lora_lands_in_real_units(files):
    model = load_flux(files["fp8"])
    assert model.double_blocks[1].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    before = {n: real_weight(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    codes = model.single_blocks[2].linear1.weight.clone()
    choice = [LoraChoice(files["diffusers"], 1.0)]
    deltas = layer_deltas(plan_loras(choice, model.config))
    set_loras(model, choice)
    layer = "double_blocks.1.img_attn.qkv"
    want = before[layer].clone()
    for d in deltas[layer]:
        want[d.row_start:d.row_start + d.rows] += d.weight_delta()
    got = real_weight(model.get_submodule(layer))
    assert model.get_submodule(layer).weight.dtype == torch.float8_e4m3fn
    error, without = (got - want).norm() / want.norm(), (before[layer] - want).norm() / want.norm()
    assert error < 0.04 and without > 5 * error  # fp8's rounding, far from the LoRA applied to scaled values
    restore_base(model)
    assert torch.equal(model.single_blocks[2].linear1.weight.view(torch.uint8), codes.view(torch.uint8))


def test_on_fp8_rows_a_lora_does_not_touch_keep_their_codes(files):
    """A diffusers LoRA on to_q of a single block changes rows 0..h-1 of linear1; under the kept scale every
    other row rounds back to its own fp8 code."""
    model = load_flux(files["fp8"])
    linear1 = model.single_blocks[2].linear1
    codes, scale = linear1.weight.view(torch.uint8).clone(), linear1.scale_weight.clone()
    small = write_lora(files["folder"] / "q_only.safetensors", UNEQUAL, "diffusers", seed=6, magnitude=0.05,
                       keep=lambda module: module == "single_transformer_blocks.2.attn.to_q")
    set_loras(model, [LoraChoice(small, 1.0)])
    h = UNEQUAL.hidden_size
    assert torch.equal(linear1.scale_weight, scale)  # the change stayed inside fp8's range under the old scale
    now = linear1.weight.view(torch.uint8)
    assert not torch.equal(now[:h], codes[:h]) and torch.equal(now[h:], codes[h:])


def test_an_fp8_scale_grows_when_the_merged_weight_leaves_its_range(files):
    model = load_flux(files["fp8"])
    layer = model.double_blocks[1].img_attn.qkv
    scale = layer.scale_weight.clone()
    big = files["folder"] / "big.safetensors"
    write_lora(big, UNEQUAL, "kohya", seed=5, magnitude=200.0)
    set_loras(model, [LoraChoice(big, 1.0)])
    assert layer.scale_weight > scale and torch.isfinite(real_weight(layer)).all()
    restore_base(model)
    assert torch.equal(layer.scale_weight, scale)


def test_weights_off_the_backup_device_are_merged_in_place_and_copied_back(files):
    """On a GPU the originals go to the CPU and the merge is written in place (GPU memory does not grow); a
    backup device that differs from the weights' takes that path on this CPU-only machine."""
    model = load_flux(files["base"])
    base = weights(model)
    qkv = model.double_blocks[1].img_attn.qkv
    param = qkv.weight
    set_loras(model, [LoraChoice(files["kohya"], 1.0)], backup_device=torch.device("cpu", 0))
    assert qkv.weight is param and not torch.equal(param, base["double_blocks.1.img_attn.qkv.weight"])
    restore_base(model)
    assert qkv.weight is param and same(weights(model), base)


def test_lokr_and_loha_follow_their_formulas(files, tmp_path):
    model = load_flux(files["base"])
    layer = "double_blocks.0.txt_attn.proj"  # (32, 32)
    before = real_weight(model.get_submodule(layer))
    g = torch.Generator().manual_seed(0)
    w1, w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(8, 3, generator=g), torch.randn(3, 16, generator=g)
    stem = "lora_unet_double_blocks_0_txt_attn_proj"
    save_file({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b,
               f"{stem}.alpha": torch.tensor(6.0)}, str(tmp_path / "k.safetensors"))
    set_loras(model, [LoraChoice(tmp_path / "k.safetensors", 0.5)])
    want = before + 0.5 * (6.0 / 3) * torch.kron(w1, w2a @ w2b)  # alpha / rank of w2's factors
    torch.testing.assert_close(real_weight(model.get_submodule(layer)), want, rtol=0, atol=1e-5)
    a1, b1, a2, b2 = (torch.randn(*s, generator=g) for s in ((32, 2), (2, 32), (32, 2), (2, 32)))
    save_file({f"{stem}.hada_w1_a": a1, f"{stem}.hada_w1_b": b1, f"{stem}.hada_w2_a": a2, f"{stem}.hada_w2_b": b2,
               f"{stem}.alpha": torch.tensor(1.0)}, str(tmp_path / "h.safetensors"))
    set_loras(model, [LoraChoice(tmp_path / "h.safetensors", 2.0)])
    want = before + 2.0 * (1.0 / 2) * (a1 @ b1) * (a2 @ b2)
    torch.testing.assert_close(real_weight(model.get_submodule(layer)), want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad files


def kohya_like(names: list[str], rows: int = 32, cols: int = 32) -> dict[str, torch.Tensor]:
    out = {}
    for n in names:
        out[f"{n}.lora_down.weight"] = torch.zeros(4, cols)
        out[f"{n}.lora_up.weight"] = torch.zeros(rows, 4)
        out[f"{n}.alpha"] = torch.tensor(4.0)
    return out


BAD = {  # name -> (tensors or raw bytes, words the error must carry)
    "sdxl": (kohya_like(["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out"]),
             "Stable Diffusion"),
    "sd3": (kohya_like(["lora_unet_joint_blocks_0_x_block_attn_qkv"]), "Stable Diffusion 3"),
    "deeper flux": (kohya_like(["lora_unet_double_blocks_7_img_attn_proj"]), "blocks this transformer does not have"),
    "wider flux": (kohya_like(["lora_unet_double_blocks_0_img_attn_proj"], 3072, 3072), "does not fit"),
    "dora": ({**kohya_like(["lora_unet_double_blocks_0_img_attn_proj"]),
              "lora_unet_double_blocks_0_img_attn_proj.dora_scale": torch.ones(32, 1)}, "DoRA"),
    "half a pair": ({"lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(32, 4)}, "no "
                    "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"),
    "text encoder only": ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
                           "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)},
                          "only the text encoders"),
    "a model": ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(96, 32), "img_in.weight": torch.zeros(32, 64)},
                "not a LoRA"),
    "pickle": (pickle.dumps({"lora_unet_x.lora_down.weight": [0.0]}), "not a safetensors file"),
    "truncated": (None, "truncated"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_file_is_refused_by_name_and_the_model_keeps_its_set(files, case, tmp_path):
    content, words = BAD[case]
    path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is None:
        path.write_bytes(files["kohya"].read_bytes()[:-100])  # a download that stopped early
    else:
        save_file(content, str(path))
    model = load_flux(files["base"])
    set_loras(model, [LoraChoice(files["kohya"], 0.5)])
    merged = weights(model)
    with pytest.raises(ModelFileError) as err:
        set_loras(model, [LoraChoice(files["diffusers"], 1.0), LoraChoice(path, 1.0)])
    assert str(path) in str(err.value) and words in str(err.value), str(err.value)
    assert same(weights(model), merged) and applied_loras(model)[0].path == files["kohya"]


def test_reading_a_lora_reads_its_header_only(files, monkeypatch):
    monkeypatch.setattr(SafetensorsFile, "tensor", lambda self, key: pytest.fail("a tensor was read"))
    lora = read_lora(files["kohya"])
    assert {a.kind for a in lora.adapters} == {"lora"} and lora.text_encoder_keys == 3
    assert {a.kind for a in read_lora(files["lokr"]).adapters} == {"lokr"}
