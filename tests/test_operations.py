"""CastLinear: storage in one dtype, compute in another; the fp8 matmul path and its fallbacks."""
import logging

import torch

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
