"""CastLinear: storage in one dtype, compute in another; the fp8 matmul path (used on compute capability 8.9 and
newer, against torch._scaled_mm's formula), fp8 quantization, and the fallbacks; ComfyUI's weight and bias patches."""
import logging

import pytest
import torch
import torch.nn.functional as F

from comfyui_krea.model_loader import operations


def fp8_linear(seed: int = 0) -> tuple[operations.CastLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layer = operations.CastLinear(64, 32)
    weight = torch.randn(32, 64, generator=gen) * 0.05
    scale = weight.abs().max() / 448
    layer.weight = torch.nn.Parameter((weight / scale).to(torch.float8_e4m3fn), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(32, generator=gen) * 0.01, requires_grad=False)
    layer.set_scale(scale)
    return layer, weight


def test_upcast_path_applies_the_scale():
    layer, weight = fp8_linear()
    x = torch.randn(3, 5, 64)
    dequantised = layer.weight.float() * layer.scale_weight
    expected = torch.nn.functional.linear(x, dequantised, layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    # fp8 storage error only: close to the original weights
    reference = torch.nn.functional.linear(x, weight, layer.bias)
    assert ((layer(x) - reference).norm() / reference.norm()) < 0.05


def test_fast_fp8_matmul_is_close_to_upcast(monkeypatch):
    layer, _ = fp8_linear()
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    upcast = layer(x).float()
    monkeypatch.setattr(operations, "_fast_fp8_broken", False)
    layer.fast_fp8 = True  # torch._scaled_mm also runs on CPU
    fast = layer(x).float()
    assert not torch.equal(fast, upcast)  # it really took the fp8 path (activations quantised too)
    assert ((fast - upcast).norm() / upcast.norm()) < 0.06


def test_fast_fp8_falls_back_once_when_the_kernel_refuses(monkeypatch, caplog):
    layer, _ = fp8_linear()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    upcast = layer(x)
    monkeypatch.setattr(operations, "_fast_fp8_broken", False)

    def refuse(*args, **kwargs):
        raise RuntimeError("mat2 must be col_major")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    layer.fast_fp8 = True
    with caplog.at_level(logging.WARNING):
        assert torch.equal(layer(x), upcast)
        assert torch.equal(layer(x), upcast)
    assert operations._fast_fp8_broken
    assert sum("fp8 matmul failed" in r.message for r in caplog.records) == 1


def test_fast_fp8_forward_traces_without_graph_breaks(monkeypatch):
    # Under torch.compile (acceleration on a GPU) every block Linear takes this path: a graph break per
    # layer would split each block into dozens of small graphs.
    layer, _ = fp8_linear()
    monkeypatch.setattr(operations, "_fast_fp8_broken", False)
    layer.fast_fp8 = True
    x = torch.randn(4, 16, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = [str(node.target) for graph in explained.graphs for node in graph.graph.nodes]
    assert any("_scaled_mm" in op for op in ops)  # the fp8 kernel is in the traced graph


# -------------------------------------------------------------------------------- when the fp8 matmul is used

# fp8 matrix units: compute capability 8.9 (Ada) and newer, e.g. 9.0 (Hopper); not 8.6 (Ampere) or 8.0 (A100).
@pytest.mark.parametrize("capability,expected", [((8, 9), True), ((9, 0), True), ((12, 0), True), ((8, 6), False),
                                                 ((8, 0), False), ((7, 5), False)])
def test_fp8_matmul_needs_compute_capability_8_9(fake_cuda, capability, expected):
    asked = fake_cuda(capability)
    device = torch.device("cuda", 1)
    assert operations.fp8_matmul_supported(device) is expected
    assert asked == [device]  # the capability of the device asked about, not of the current one


def test_fp8_matmul_is_off_off_cuda_without_a_runtime_or_without_scaled_mm(fake_cuda):
    fake_cuda((9, 0))
    assert operations.fp8_matmul_supported(torch.device("cpu")) is False
    assert operations.fp8_matmul_supported(torch.device("meta")) is False
    fake_cuda((9, 0), available=False)
    assert operations.fp8_matmul_supported(torch.device("cuda")) is False
    fake_cuda((9, 0), available=True, scaled_mm=False)
    assert operations.fp8_matmul_supported(torch.device("cuda")) is False


# --------------------------------------------------- fp8 quantization and the fp8 matmul, against the formula

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_fp8_maps_the_largest_magnitude_to_448(dtype):
    w = torch.tensor([[0.05, -0.1], [0.025, 0.0]]).to(dtype)
    q, scale = operations.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(w.float().abs().max().item() / 448.0, rel=1e-7)
    assert q.float()[0, 1].item() == -448.0
    assert torch.allclose(q.float() * scale, w.float(), rtol=0.07, atol=0)
    q0, scale0 = operations.quantize_fp8(torch.zeros(3, 3, dtype=dtype))  # no division by zero
    assert 0 < scale0.item() <= 1e-12 and torch.equal(q0.float(), torch.zeros(3, 3))


def fast_fp8_layer(scaled: bool, bias: bool, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    layer = operations.CastLinear(32, 16, bias=bias)
    w8 = (torch.randn(16, 32, generator=gen) * 100).to(torch.float8_e4m3fn)
    layer.weight = torch.nn.Parameter(w8, requires_grad=False)
    if bias:
        layer.bias = torch.nn.Parameter((0.01 * torch.randn(16, generator=gen)).bfloat16(), requires_grad=False)
    layer.set_scale(torch.tensor(0.004) if scaled else None)
    layer.fast_fp8 = True
    return layer


@pytest.mark.parametrize("scaled,bias", [(True, True), (False, True), (True, False)])
def test_fast_fp8_matmul_is_the_scaled_product_of_the_quantized_inputs(monkeypatch, scaled, bias):
    # torch._scaled_mm's contract: (a8 * scale_a) @ (b8 * scale_b) + bias, with the activations quantized per
    # tensor so that max |x| maps to 448. Written out in float64 here; small activations (max 0.02) check
    # that their scale is not clamped.
    monkeypatch.setattr(operations, "_fast_fp8_broken", False)
    layer = fast_fp8_layer(scaled, bias)
    x = (0.02 * torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))).bfloat16()
    x_scale = x.float().abs().max() / 448.0
    x8 = (x.float() / x_scale).to(torch.float8_e4m3fn)
    w_scale = 0.004 if scaled else 1.0
    want = (x8.double() * x_scale.double()) @ (layer.weight.double() * w_scale).T
    if bias:
        want = want + layer.bias.double()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 16)
    assert not operations._fast_fp8_broken  # the fp8 kernel ran, no fallback
    assert (got.double() - want).abs().max() < 0.01 * want.abs().max()  # measured 0.2%; 4% with a clamped scale


@pytest.mark.parametrize("bias_dtype,scale_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
def test_fast_fp8_takes_a_bias_and_a_scale_stored_in_other_dtypes(monkeypatch, bias_dtype, scale_dtype):
    monkeypatch.setattr(operations, "_fast_fp8_broken", False)
    layer = fast_fp8_layer(scaled=True, bias=True)
    layer.bias = torch.nn.Parameter(layer.bias.to(bias_dtype), requires_grad=False)
    layer.set_scale(torch.tensor(0.004, dtype=scale_dtype))
    x = (0.02 * torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))).bfloat16()
    want = x.double() @ (layer.weight.double() * 0.004).T + layer.bias.double()
    got = layer(x)
    assert not operations._fast_fp8_broken  # the fp8 kernel took them, no fallback
    # Activations quantized to fp8 (3 mantissa bits): measured 3% of the largest output.
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max() < 0.06 * want.abs().max()


def test_a_scaled_weight_computes_in_the_inputs_dtype():
    layer = fast_fp8_layer(scaled=True, bias=True)
    layer.fast_fp8 = False
    x = (0.02 * torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))).bfloat16()
    got = layer(x)
    want = x.double() @ (layer.weight.double() * 0.004).T + layer.bias.double()
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max() < 0.02 * want.abs().max()


# ------------------------------------------------------------------------------------------ ComfyUI's patches

def test_comfys_weight_and_bias_patches_apply_in_order():
    # ModelPatcher appends LoRA patches as functions of the cast weight (comfy.ops' weight_function contract).
    layer = operations.CastLinear(4, 3)
    x = torch.randn(2, 4)
    plain = layer(x)
    layer.weight_function = [lambda w: w * 2, lambda w: w + 1]
    layer.bias_function = [lambda b: b - 1, lambda b: b * 3]
    want = F.linear(x, layer.weight * 2 + 1, (layer.bias - 1) * 3)
    torch.testing.assert_close(layer(x), want)
    assert not torch.allclose(layer(x), plain)
