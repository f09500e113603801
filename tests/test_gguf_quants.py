"""GGUF's block types against the format's own library: the pack's torch dequantization equals
`gguf.quants.dequantize` (numpy) bit for bit, per type on random blocks and on whole tensors of a file gguf's
writer made; the file reader (shapes reversed, ComfyUI-GGUF's orig_shape, metadata, refused types,
truncation, the missing package); and QuantizedLinear computing with exactly those weights.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")

from comfyui_krea.model_loader import ModelFileError, open_checkpoint  # noqa: E402
from comfyui_krea.model_loader.checkpoints import GGUFFile  # noqa: E402
from comfyui_krea.model_loader.gguf import QUANT_TYPES, dequantize  # noqa: E402
from comfyui_krea.model_loader.gguf.encode import encode, random_blocks  # noqa: E402
from comfyui_krea.model_loader.gguf.writing import write_gguf  # noqa: E402
from comfyui_krea.model_loader.operations import QuantizedLinear  # noqa: E402
from conftest import rel_err  # noqa: E402

QUANTIZED = [name for name, t in QUANT_TYPES.items() if t.quantized]
# What the fixture encoders reach on unit-normal weights (gguf's numpy dequantization of their bytes): a check
# that the test files are realistic, not a property of the loader.
ENCODE_ERROR = {"Q8_0": 0.008, "Q6_K": 0.03, "Q5_1": 0.05, "Q5_0": 0.05, "Q5_K": 0.05, "Q4_1": 0.1, "Q4_0": 0.1,
                "Q4_K": 0.1, "Q3_K": 0.22, "Q2_K": 0.4}


def ggml(name: str):
    return gguf.GGMLQuantizationType[name]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.int32),
                                                                                      b.view(np.int32))


def test_the_type_table_is_ggmls():
    for name, t in QUANT_TYPES.items():
        assert int(ggml(name)) == t.ggml_id
        assert gguf.GGML_QUANT_SIZES[ggml(name)] == (t.block_size, t.block_bytes)
    assert QUANT_TYPES["Q4_K"].bits_per_weight == 4.5 and QUANT_TYPES["Q8_0"].bits_per_weight == 8.5


@pytest.mark.parametrize("name", QUANTIZED)
def test_random_blocks_dequantize_bit_for_bit_as_ggufs_numpy(name):
    qtype = QUANT_TYPES[name]
    rng = np.random.default_rng(qtype.ggml_id)
    for scale in (1e-4, 0.02, 3.0):  # tiny, typical and large block scales; every quant and sub-scale bit pattern
        blocks = random_blocks(qtype, 2048, rng, scale)
        reference = gguf.quants.dequantize(blocks, ggml(name))
        ours = dequantize(torch.from_numpy(blocks), qtype, reference.shape).numpy()
        assert same_bits(ours, reference), name


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequantize_takes_rows_and_gives_the_asked_dtype(name):
    qtype = QUANT_TYPES[name]
    rows, cols = 6, 2 * qtype.block_size
    blocks = random_blocks(qtype, rows * cols // qtype.block_size, np.random.default_rng(1))
    raw = torch.from_numpy(blocks.reshape(rows, qtype.row_bytes(cols)))
    full = dequantize(raw, qtype, (rows, cols))
    assert full.shape == (rows, cols) and full.dtype == torch.float32
    half = dequantize(raw, qtype, (rows, cols), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))
    # a slice of whole rows dequantizes to the same rows
    assert torch.equal(dequantize(raw[2:4], qtype, (2, cols)), full[2:4])


@pytest.mark.parametrize("name", QUANTIZED)
def test_fixture_encoders_give_bytes_gguf_reads_back_close(name):
    weights = np.random.default_rng(2).standard_normal((8, 512)).astype(np.float32)
    back = gguf.quants.dequantize(encode(weights, QUANT_TYPES[name], gguf), ggml(name))
    assert back.shape == weights.shape
    assert np.linalg.norm(back - weights) / np.linalg.norm(weights) < ENCODE_ERROR[name]


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory):
    """One tensor of each type (3-D and 2-D, rows of several blocks), written by gguf's writer."""
    gen = torch.Generator().manual_seed(4)
    shapes = {name: ((2, 3, 512) if i % 2 else (5, 768)) for i, name in enumerate(QUANT_TYPES)}
    values = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "types.gguf",
                      [(f"t.{name}", lambda v=v: v, name) for name, v in values.items()], "flux",
                      {"general.name": "every type"})
    return path, values


def test_whole_tensors_read_as_ggufs_reader_and_numpy_dequantization_give_them(every_type_file):
    path, values = every_type_file
    ours = GGUFFile(path)
    theirs = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, v in values.items():
        key = f"t.{name}"
        assert ours.shape(key) == tuple(v.shape)  # torch order (GGUF stores it reversed)
        t = theirs[key]
        reference = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(v.shape))
        got = ours.tensor(key).float().numpy()
        assert same_bits(got, reference.astype(np.float32)), name
        assert (ours.quant_type(key) is not None) == QUANT_TYPES[name].quantized
    assert ours.metadata["general.name"] == "every type" and ours.architecture == "flux"
    assert isinstance(open_checkpoint(path), GGUFFile)


def test_quantized_tensors_are_views_of_the_file(every_type_file):
    path, _ = every_type_file
    f = GGUFFile(path)
    first, second = f.raw("t.Q4_K"), f.raw("t.Q4_K")
    assert first.dtype == torch.uint8 and first.data_ptr() == second.data_ptr()  # the map, never a copy
    assert first.shape == (5, QUANT_TYPES["Q4_K"].row_bytes(768))
    assert f.nbytes() == sum(t.n_bytes for t in gguf.GGUFReader(path).tensors)


def test_a_gguf_file_is_told_by_its_bytes_not_its_name(tmp_path, every_type_file):
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(every_type_file[0].read_bytes())
    assert isinstance(open_checkpoint(renamed), GGUFFile)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="GGUF's magic bytes"):
        open_checkpoint(fake)


def test_comfyui_ggufs_original_shape_metadata_is_honoured(tmp_path):
    # ComfyUI-GGUF's converter stores some tensors reshaped to rows of 256 and records the real shape.
    values = torch.randn(4, 8, 16)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_array("comfy.gguf.orig_shape.conv.weight", [4, 8, 16])
    writer.add_tensor("conv.weight", values.reshape(2, 256).numpy())
    writer.write_header_to_file(path=tmp_path / "reshaped.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(tmp_path / "reshaped.gguf")
    assert f.shape("conv.weight") == (4, 8, 16) and torch.equal(f.tensor("conv.weight"), values)


def test_types_it_does_not_read_are_refused_by_name(tmp_path):
    writer = gguf.GGUFWriter(path=None, arch="flux")
    blocks = np.random.default_rng(0).integers(0, 256, size=(4, 2 * 36), dtype=np.uint8)  # IQ4_NL: 32 in 18 B
    writer.add_tensor("double_blocks.0.img_attn.qkv.weight", blocks[:, :36], raw_dtype=ggml("IQ4_NL"))
    writer.add_tensor("img_in.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file(path=tmp_path / "iq.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFileError, match=r"IQ4_NL \(1 tensors, e.g. double_blocks.0.img_attn.qkv.weight\)"):
        open_checkpoint(tmp_path / "iq.gguf")


def test_a_truncated_file_is_named(tmp_path, every_type_file):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(every_type_file[0].read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match="truncated|not a readable GGUF"):
        GGUFFile(cut)


def test_without_the_gguf_package_the_error_says_how_to_install_it(monkeypatch, every_type_file):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModelFileError, match=r"pip install gguf .*ComfyUI-GGUF"):
        open_checkpoint(every_type_file[0])


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q3_K", "F16"])
def test_quantized_linear_computes_with_the_numpy_dequantized_weight(name):
    qtype = QUANT_TYPES[name]
    weight = torch.randn(24, 512, generator=torch.Generator().manual_seed(5))
    blocks = encode(weight.numpy(), qtype, gguf)
    reference_weight = torch.from_numpy(gguf.quants.dequantize(blocks, ggml(name)).astype(np.float32))
    layer = QuantizedLinear(512, 24, device="meta").requires_grad_(False)
    bias = torch.randn(24)
    if qtype.quantized:  # else a plain float layer: a CastLinear
        layer.hold_quantized(qtype)
    layer.load_state_dict({"weight": torch.from_numpy(blocks), "bias": bias}, assign=True)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(6))
    assert torch.equal(layer(x), F.linear(x, reference_weight, bias))
    assert rel_err(layer(x), F.linear(x, weight, bias)) < ENCODE_ERROR.get(name, 0.01)
    # The hook for a LoRA kept as its factors: its output is added beside the matmul.
    down, up = torch.randn(2, 512), torch.randn(24, 2)
    layer.adapters = [lambda t: 0.5 * (t @ down.T @ up.T)]
    assert torch.allclose(layer(x), F.linear(x, reference_weight, bias) + 0.5 * x @ down.T @ up.T, atol=1e-4)


def test_comfyuis_weight_hooks_on_a_quantized_layer():
    """convert_weight / set_weight, which ComfyUI's ModelPatcher calls around a LoRA merge (get_key_weight)."""
    qtype = QUANT_TYPES["Q4_K"]
    blocks = random_blocks(qtype, 8 * 512 // 256, np.random.default_rng(3)).reshape(8, qtype.row_bytes(512))
    layer = QuantizedLinear(512, 8, bias=False, device="meta").requires_grad_(False)
    layer.hold_quantized(qtype)
    layer.load_state_dict({"weight": torch.from_numpy(blocks)}, assign=True)
    weight = layer.dequantized_weight(torch.device("cpu"), torch.float32)
    # a resident layer's weight arrives as its bytes cast to float32; a streamed one's already dequantized
    assert torch.equal(layer.convert_weight(layer.weight.float(), inplace=True), weight)
    assert layer.convert_weight(weight) is weight
    assert layer.set_weight(weight + 1, return_weight=True) is not None
    layer.set_weight(weight + 1)  # a merge: blocks cannot take it; the layer is marked, its bytes unchanged
    assert torch.equal(layer.weight, torch.from_numpy(blocks))
    with pytest.raises(RuntimeError, match="LoRA loaders only"):
        layer(torch.randn(1, 512))  # never computes silently without the merged patch
    dense = QuantizedLinear(512, 8)
    assert not hasattr(dense, "convert_weight") and not hasattr(dense, "set_weight")  # ComfyUI merges it itself
