"""LoRA on GGUF weights outside ComfyUI: quantized layers keep their blocks and run each LoRA as its low-rank factors
beside the dequantized matmul; LoHa, LoKr and full differences are merged into a dequantized copy of just their
layers. Oracle: the same GGUF file with every quantized layer dequantized (float32) and the LoRA merged into it by
the engine's merge, which tests/test_lora_parity.py checks against diffusers/peft and ComfyUI.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")

from comfyui_krea.model_loader import load_flux  # noqa: E402
from comfyui_krea.model_loader.flux import FluxConfig  # noqa: E402
from comfyui_krea.model_loader.flux.gguf_files import write_random_flux_gguf  # noqa: E402
from comfyui_krea.model_loader.lora import LoraChoice, layer_deltas, plan_loras, restore_base, set_loras  # noqa: E402
from comfyui_krea.model_loader.lora.beside import LowRankAdapter  # noqa: E402
from comfyui_krea.model_loader.operations import QuantizedLinear  # noqa: E402
from conftest import flux_inputs, rel_err  # noqa: E402
from lora_files import write_lora  # noqa: E402

# Two double and three single blocks (the LoRA files touch double block 1 and single block 2), every block Linear's
# input a whole number of Q8_0 blocks (32 weights), so each one is quantized.
CONFIG = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=64, num_heads=2,
                    depth=2, depth_single_blocks=3, axes_dim=(8, 12, 12))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_lora")
    made = {"base": write_random_flux_gguf(folder / "base-Q8_0.gguf", CONFIG, "Q8_0", seed=2)}
    for seed, fmt in enumerate(("kohya", "diffusers", "onetrainer", "lokr", "loha")):
        made[fmt] = write_lora(folder / f"{fmt}.safetensors", CONFIG, fmt, seed=seed + 1)
    return made


def quantized(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.quant_type is not None}


def dequantized_model(path):
    """The oracle's base: the same file with every quantized layer holding its dequantized float32 weight."""
    model = load_flux(path)
    for layer in quantized(model).values():
        layer.weight = torch.nn.Parameter(layer.dequantized_weight(torch.device("cpu"), torch.float32),
                                          requires_grad=False)
        layer.quant_type = None
    return model


def output(model) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_orig(**flux_inputs(CONFIG))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("formats", [("kohya",), ("diffusers",), ("onetrainer",), ("kohya", "diffusers")])
def test_low_rank_loras_run_beside_the_quantized_matmul_as_merging_into_the_dequantized_weight(files, formats):
    choices = [LoraChoice(files[fmt], strength) for fmt, strength in zip(formats, (0.8, -1.3))]
    model = load_flux(files["base"])
    layers = quantized(model)
    blocks = {n: m.weight for n, m in layers.items()}
    set_loras(model, choices)
    with_adapters = [n for n, m in layers.items() if m.adapters]
    # The diffusers pieces (q, k, v; linear1's four) share one adapter per fused layer; the blocks are untouched.
    assert len(with_adapters) >= 5 and all(len(layers[n].adapters) == 1 for n in with_adapters)
    assert all(m.weight is blocks[n] and m.quant_type is not None for n, m in layers.items())
    oracle = set_loras(dequantized_model(files["base"]), choices)
    assert rel_err(output(model), output(oracle)) < 1e-5
    assert rel_err(output(model), output(restore_base(dequantized_model(files["base"])))) > 1e-3  # it acts


def test_the_adapter_is_scale_times_x_down_up_in_each_deltas_rows(files):
    model = load_flux(files["base"])
    choices = [LoraChoice(files["diffusers"], 0.7), LoraChoice(files["kohya"], 1.5)]
    deltas = layer_deltas(plan_loras(choices, model.config))["double_blocks.1.img_attn.qkv"]
    assert len({d.row_start for d in deltas}) > 1  # diffusers' q, k and v each fill their third of the rows
    layer = model.get_submodule("double_blocks.1.img_attn.qkv")
    adapter = LowRankAdapter.of_deltas(layer.out_features, deltas, torch.device("cpu"), torch.float32)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(3, 5, layer.out_features)
    for d in deltas:
        up, down, scale = d.low_rank()
        expected[..., d.row_start:d.row_start + d.rows] += scale * x @ down.T @ up.T
    torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-6)
    assert adapter.rank == sum(d.low_rank()[1].shape[0] for d in deltas)


@pytest.mark.parametrize("fmt", ["lokr", "loha"])
def test_loha_and_lokr_are_merged_into_a_dequantized_copy_of_their_layers_only(files, fmt):
    model = load_flux(files["base"])
    layers = quantized(model)
    blocks = {n: m.weight for n, m in layers.items()}
    choices = [LoraChoice(files[fmt], 0.9), LoraChoice(files["kohya"], 0.6)]
    changed = set(layer_deltas(plan_loras(choices[:1], model.config)))
    set_loras(model, choices)
    dense = {n for n, m in layers.items() if m.quant_type is None}
    assert dense == changed & set(layers)  # only the layers the LoHa/LoKr changes
    assert all(layers[n].weight.dtype == torch.float32 and not layers[n].adapters for n in dense)  # CPU compute
    assert any(m.adapters for n, m in layers.items() if n not in dense)  # the kohya layers keep the blocks
    assert rel_err(output(model), output(set_loras(dequantized_model(files["base"]), choices))) < 1e-5
    restore_base(model)
    assert all(m.weight is blocks[n] and m.quant_type is not None and not m.adapters for n, m in layers.items())


def test_a_new_set_takes_the_old_one_out_bit_for_bit_and_equals_a_fresh_application(files):
    model = load_flux(files["base"])
    before, base_output = state(model), output(model)
    set_loras(model, [LoraChoice(files["kohya"], 1.0), LoraChoice(files["loha"], 0.5)])
    choice = [LoraChoice(files["diffusers"], 0.6)]
    set_loras(model, choice)
    assert torch.equal(output(model), output(set_loras(load_flux(files["base"]), choice)))
    set_loras(model, [])
    assert same(state(model), before) and torch.equal(output(model), base_output)
    assert not any(m.adapters for m in quantized(model).values())


def test_the_adapters_follow_the_input_dtype(files):
    model = load_flux(files["base"])
    set_loras(model, [LoraChoice(files["kohya"], 1.0)])
    layer = model.get_submodule("double_blocks.1.img_attn.qkv")
    x = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(1))
    reference = layer(x)
    half = layer(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and rel_err(half, reference) < 2e-2
