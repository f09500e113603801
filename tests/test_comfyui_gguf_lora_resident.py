"""ComfyUI's LoRA patches on a GGUF transformer it holds resident (nodes/host/comfyui_models.py): ComfyUI cannot
merge a patch into quantized blocks, so after each load the MODEL's callback gives each patched quantized layer its
patches at each call: plain LoRAs as low-rank factors beside the matmul, with ComfyUI's arithmetic (weight[rows] +=
strength * alpha / rank * up @ down, rows from the patch's offset (dim, start, length)), anything else as ComfyUI's
own LowVramPatch on the dequantized weight; on detach the layers are plain again.

Run in-process over the stand-ins of tests/comfyui_adapter_stand_ins.py (ModelPatcher's `patches` and callbacks in
ComfyUI 0.3.64's shapes); the real ComfyUI's LoRA loaders on the same model are in tests/test_comfyui_gguf_host.py.
"""
from __future__ import annotations

import pytest
import torch
from comfyui_adapter_stand_ins import CPU, adapter_over_stand_ins

from comfyui_krea.model_loader.flux import FluxConfig
from comfyui_krea.model_loader.flux.gguf_files import write_random_flux_gguf

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")

# Hidden 64 (two Q8_0 blocks a row); qkv has 192 rows, so a patch on its v third starts at row 128.
SMALL = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=2,
                   depth=1, depth_single_blocks=1, axes_dim=(8, 12, 12))
QKV = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
PROJ = "diffusion_model.double_blocks.0.img_attn.proj.weight"
MLP = "diffusion_model.double_blocks.0.img_mlp.0.weight"
LINEAR1 = "diffusion_model.single_blocks.0.linear1.weight"
UNPATCHED = "diffusion_model.double_blocks.0.txt_attn.proj.weight"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_random_flux_gguf(tmp_path_factory.mktemp("resident") / "small-Q8_0.gguf", SMALL, "Q8_0", seed=4)


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    yield from adapter_over_stand_ins(monkeypatch, tmp_path)


def layer_of(patcher, key: str):
    return patcher.model.get_submodule(key.removesuffix(".weight"))


def factors(out_rows: int, in_features: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_rows, rank, generator=generator), torch.randn(rank, in_features, generator=generator))


def lora(comfy, up, down, alpha=None, mid=None, dora_scale=None, reshape=None):
    return comfy.stand_ins["comfy.weight_adapter"].LoRAAdapter(set(), (up, down, alpha, mid, dora_scale, reshape))


def patch(patcher, key, adapter, strength=1.0, strength_model=1.0, offset=None, function=None):
    """As ModelPatcher.add_patches files a patch."""
    patcher.patches.setdefault(key, []).append((strength, adapter, strength_model, offset, function))


def loaded(comfy, patcher) -> None:
    """ComfyUI's load: it asks each quantized layer to merge (set_weight marks it), then runs the ON_LOAD callbacks."""
    for key in patcher.patches:
        layer_of(patcher, key).merge_requested = True
    for callback in patcher.get_all_callbacks("on_load"):
        callback(patcher, CPU, 0, False, True)


def outputs(patcher, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output, and its output over its dequantized weight alone."""
    layer = layer_of(patcher, key)
    weight = layer.dequantized_weight(CPU, torch.float32)
    return layer(x), torch.nn.functional.linear(x, weight, layer.bias)


def test_the_gguf_model_carries_the_load_and_detach_callbacks(comfy, gguf_file):
    patcher = comfy.models.transformer_model(gguf_file, "default")
    assert {kind: list(by_key) for kind, by_key in patcher.callbacks.items()} == {
        "on_load": ["krea_gguf_lora"], "on_detach": ["krea_gguf_lora"]}


def test_plain_loras_run_beside_the_matmul_with_comfyuis_scale_and_rows(comfy, gguf_file):
    patcher = comfy.models.transformer_model(gguf_file, "default")
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    up, down = factors(192, 64, 4, seed=1)
    v_up, v_down = factors(64, 64, 2, seed=2)
    patch(patcher, QKV, lora(comfy, up, down, alpha=2.0), strength=0.5)  # 0.5 * 2 / 4
    patch(patcher, QKV, lora(comfy, v_up, v_down), strength=0.75, offset=(0, 128, 64))  # no alpha: strength alone
    loaded(comfy, patcher)
    got, plain = outputs(patcher, QKV, x)
    delta = 0.25 * up @ down
    delta[128:] += 0.75 * v_up @ v_down
    assert torch.allclose(got, plain + x @ delta.T, rtol=1e-4, atol=1e-4)  # (torch.testing imports DTensor: slow)
    layer = layer_of(patcher, QKV)
    assert layer.resident_weight_function == [] and not layer.merge_requested
    got, plain = outputs(patcher, UNPATCHED, x)
    assert torch.equal(got, plain)


def test_other_patches_get_comfyuis_own_patch_function_on_the_dequantized_weight(comfy, gguf_file):
    patcher = comfy.models.transformer_model(gguf_file, "default")
    weights = comfy.stand_ins["comfy.weight_adapter"]
    up, down = factors(64, 64, 4, seed=3)
    patch(patcher, PROJ, lora(comfy, up, down), strength_model=0.5)  # a model strength other than 1
    patch(patcher, MLP, weights.LoHaAdapter(set(), (up, down, 1.0, up, down, None, None, None)))
    cases = {
        LINEAR1: [lora(comfy, *factors(448, 64, 2, seed=5), mid=torch.ones(2, 2))],  # LoCon's mid
        "diffusion_model.double_blocks.0.txt_attn.qkv.weight": [lora(comfy, *factors(192, 64, 2, 6),
                                                                     dora_scale=torch.ones(192, 1))],
        "diffusion_model.double_blocks.0.txt_mlp.0.weight": [lora(comfy, *factors(256, 64, 2, 7),
                                                                  reshape=(256, 64))],
        "diffusion_model.double_blocks.0.img_mlp.2.weight": [lora(comfy, factors(64, 256, 2, 8)[0][:, :, None, None],
                                                                  factors(64, 256, 2, 8)[1])],  # a 4-D up
        "diffusion_model.double_blocks.0.txt_mlp.2.weight": [lora(comfy, factors(64, 256, 2, 9)[0],
                                                                  factors(64, 256, 2, 9)[1][:, :, None])],
        "diffusion_model.double_blocks.0.img_mod.lin.weight": [lora(comfy, *factors(384, 64, 2, 10))],
        "diffusion_model.single_blocks.0.modulation.lin.weight": [lora(comfy, *factors(192, 32, 2, 11))],
    }
    for key, adapters in cases.items():
        patch(patcher, key, adapters[0])
    patcher.patches["diffusion_model.double_blocks.0.img_mod.lin.weight"][0] = (
        1.0, cases["diffusion_model.double_blocks.0.img_mod.lin.weight"][0], 1.0, None, lambda w: w)  # a function
    patcher.patches["diffusion_model.single_blocks.0.modulation.lin.weight"][0] = (
        1.0, cases["diffusion_model.single_blocks.0.modulation.lin.weight"][0], 1.0, (1, 0, 32), None)  # columns
    loaded(comfy, patcher)
    for key in [PROJ, MLP, *cases]:
        layer = layer_of(patcher, key)
        (function,) = layer.resident_weight_function
        assert isinstance(function, comfy.stand_ins["comfy.model_patcher"].LowVramPatch), key
        assert (function.key, function.patches) == (key, patcher.patches) and function.patches is patcher.patches
        assert (function.convert_func, function.set_func) == (layer.convert_weight, layer.set_weight)
        assert layer.resident_adapters == [] and not layer.merge_requested


def test_a_patch_on_part_of_the_rows_of_another_size_is_not_taken_as_factors(comfy, gguf_file):
    patcher = comfy.models.transformer_model(gguf_file, "default")
    up, down = factors(64, 64, 2, seed=12)
    patch(patcher, QKV, lora(comfy, up, down), offset=(0, 64, 32))  # 64 rows of up for 32 rows of the weight
    loaded(comfy, patcher)
    assert len(layer_of(patcher, QKV).resident_weight_function) == 1


def test_detach_leaves_every_layer_plain(comfy, gguf_file):
    patcher = comfy.models.transformer_model(gguf_file, "default")
    up, down = factors(192, 64, 4, seed=13)
    patch(patcher, QKV, lora(comfy, up, down, alpha=4.0))
    patch(patcher, PROJ, lora(comfy, *factors(64, 64, 2, 14)), strength_model=0.5)
    loaded(comfy, patcher)
    for key in (QKV, PROJ):
        layer_of(patcher, key).merge_requested = True
    for callback in patcher.get_all_callbacks("on_detach"):
        callback(patcher, True)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(15))
    for key in (QKV, PROJ):
        layer = layer_of(patcher, key)
        assert layer.resident_adapters == [] and layer.resident_weight_function == []
        got, plain = outputs(patcher, key, x)
        assert torch.equal(got, plain)


def test_the_factors_are_held_in_the_models_compute_dtype(comfy, gguf_file):
    patcher = comfy.models.transformer_model(gguf_file, "default")
    patcher.model.diffusion_model.compute_dtype = torch.bfloat16  # as on a GPU computing in bf16
    up, down = factors(192, 64, 4, seed=16)
    patch(patcher, QKV, lora(comfy, up, down))
    loaded(comfy, patcher)
    (adapter,) = layer_of(patcher, QKV).resident_adapters
    assert adapter.down.dtype == adapter.up.dtype == torch.bfloat16
