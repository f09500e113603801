"""FLUX transformers from GGUF files written here in ComfyUI-GGUF's layout: the architecture read off the shapes,
both key layouts, quantized Linear weights kept as views of the file's blocks, the transformer equal bit for
bit to one holding gguf's own numpy dequantization of the same bytes, and each type's drift from the bf16
weights it was made from after a whole sampling schedule.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")

from comfyui_krea.model_loader import FileKind, ModelFileError, identify, load_flux, open_checkpoint  # noqa: E402
from comfyui_krea.model_loader.checkpoints import GGUFFile, StateDictSource  # noqa: E402
from comfyui_krea.model_loader.flux import (  # noqa: E402
    FluxConfig,
    RandomFluxSource,
    config_from_checkpoint,
    load_flux_from_source,
    write_random_flux_checkpoint,
)
from comfyui_krea.model_loader.flux.gguf_files import (  # noqa: E402
    flux_gguf_type,
    write_flux_gguf,
    write_random_flux_gguf,
)
from comfyui_krea.model_loader.gguf.writing import write_gguf  # noqa: E402
from comfyui_krea.model_loader.operations import QuantizedLinear  # noqa: E402
from comfyui_krea.sampling.denoise import GenerationSettings, generate  # noqa: E402
from conftest import flux_inputs, rel_err  # noqa: E402

# Rows of whole 256-weight blocks (hidden 256, MLP 1024, heads of 128 with FLUX's rotary split), one block of
# each kind: every Linear of the blocks can hold every type.
GGUF_FLUX = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=256, context_in_dim=256, hidden_size=256,
                       num_heads=2, depth=1, depth_single_blocks=1)
# Latent rel error after the whole schedule (6 steps, 64x64) against the bf16 weights the file was made from
# (measured: docs/gguf.md); the bounds leave room for other seeds, not for another order of magnitude.
DRIFT = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q5_1": 0.06, "Q5_0": 0.06, "Q4_K": 0.12, "Q4_1": 0.12,
         "Q4_0": 0.15, "Q3_K": 0.3, "Q2_K": 0.5}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_flux")
    made = {"bf16": write_random_flux_checkpoint(folder / "bf16.safetensors", GGUF_FLUX, seed=3,
                                                 dtype=torch.bfloat16)}
    for qtype in DRIFT:
        made[qtype] = write_random_flux_gguf(folder / f"{qtype}.gguf", GGUF_FLUX, qtype, seed=3)
    return made


def quantized_layers(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.quant_type is not None}


def test_the_file_is_laid_out_as_comfyui_ggufs_tools_write_it(files):
    reader = gguf.GGUFReader(files["Q4_K"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q4_K"
    assert types["img_in.weight"] == "BF16" and types["final_layer.linear.weight"] == "BF16"
    assert types["double_blocks.0.img_attn.qkv.bias"] == "F32" and types["single_blocks.0.norm.key_norm.scale"] == "F32"
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[-1]]).decode() == "flux"
    assert flux_gguf_type("single_blocks.0.linear2.weight", (256, 1000), "Q4_K") == "F16"  # rows not whole blocks


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_architecture_from_shapes_in_either_key_layout(tmp_path, prefix):
    path = write_random_flux_gguf(tmp_path / "m.gguf", GGUF_FLUX, "Q8_0", seed=3, prefix=prefix)
    assert identify(open_checkpoint(path).keys()) is FileKind.FLUX_TRANSFORMER
    assert config_from_checkpoint(path) == GGUF_FLUX
    model = load_flux(path)
    assert len(quantized_layers(model)) == 13  # 10 Linears of the double block, 3 of the single; embedders BF16
    assert model.storage_dtype == torch.uint8 and model.compute_dtype == torch.float32


def test_a_diffusers_layout_gguf_fuses_its_blocks_and_equals_the_bfl_one(tmp_path):
    # Each row of blocks is independent, so q/k/v fuse (and the final modulation's halves swap) as bytes.
    def every_matrix_q8_0(path, source):
        return write_gguf(path, [(k, lambda k=k: source.tensor(k), "Q8_0" if len(source.shape(k)) == 2 else "F32")
                                 for k in source.keys()], "flux")

    bfl = load_flux(every_matrix_q8_0(tmp_path / "bfl.gguf", RandomFluxSource(GGUF_FLUX, 3, torch.float32)))
    diffusers = open_checkpoint(write_random_flux_checkpoint(tmp_path / "d.safetensors", GGUF_FLUX, seed=3,
                                                             layout="diffusers"))
    model = load_flux(every_matrix_q8_0(tmp_path / "d.gguf", diffusers))
    assert len(quantized_layers(model)) == len(quantized_layers(bfl)) == 23
    inputs = flux_inputs(GGUF_FLUX)
    with torch.no_grad():
        assert torch.equal(model.forward_orig(**inputs), bfl.forward_orig(**inputs))


def test_quantized_weights_stay_the_files_bytes(files):
    source = GGUFFile(files["Q4_K"])
    model = load_flux_from_source(source, name="q4k")
    layers = quantized_layers(model)
    assert {m.quant_type.name for m in layers.values()} == {"Q4_K"}
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.uint8 and qkv.weight.data_ptr() == source.raw(
        "double_blocks.0.img_attn.qkv.weight").data_ptr()  # a view of the memory map, never a copy
    held = sum(t.nbytes for t in model.state_dict().values())
    assert held == source.nbytes()  # every tensor as stored: nothing dequantized on load


def numpy_dequantized_source(path) -> StateDictSource:
    """Every tensor of a GGUF file dequantized by gguf's own numpy code (the oracle), as a state dict."""
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        state[t.name] = torch.from_numpy(values.reshape(shape).copy())
    return StateDictSource(state)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_K", "Q2_K"])
def test_the_transformer_equals_one_holding_ggufs_numpy_dequantization(files, qtype):
    ours = load_flux(files[qtype])
    oracle = load_flux_from_source(numpy_dequantized_source(files[qtype]))
    inputs = flux_inputs(GGUF_FLUX)
    with torch.no_grad():
        assert torch.equal(ours.forward_orig(**inputs), oracle.forward_orig(**inputs))


def sample(path) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    txt, vec = torch.randn(1, 8, GGUF_FLUX.context_in_dim, generator=gen), torch.randn(1, 256, generator=gen)
    settings = GenerationSettings(width=64, height=64, num_steps=6, guidance=3.5, seed=5, num_images=1)
    model = load_flux(path)
    return generate(model, txt, vec, settings, torch.device("cpu"), model.compute_dtype).latents


@pytest.fixture(scope="module")
def bf16_latents(files):
    return sample(files["bf16"])


@pytest.mark.parametrize("qtype", list(DRIFT))
def test_drift_from_the_bf16_weights_after_the_whole_schedule(files, bf16_latents, qtype):
    drift = rel_err(sample(files[qtype]), bf16_latents)
    assert 0 < drift < DRIFT[qtype]


def test_a_bf16_gguf_is_the_bf16_model_exactly(tmp_path, files, bf16_latents):
    path = write_random_flux_gguf(tmp_path / "bf16.gguf", GGUF_FLUX, "BF16", seed=3)
    assert torch.equal(sample(path), bf16_latents)


@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8_e4m3fn"])
def test_other_weight_dtypes_dequantize_on_load(files, weight_dtype):
    model = load_flux(files["Q8_0"], weight_dtype)
    assert not quantized_layers(model)
    reference = load_flux(files["Q8_0"])
    inputs = flux_inputs(GGUF_FLUX)
    with torch.no_grad():
        error = rel_err(model.forward_orig(**inputs), reference.forward_orig(**inputs))
    assert error < (0.01 if weight_dtype == "bf16" else 0.08)


def test_a_gguf_of_another_model_is_named(tmp_path):
    path = write_gguf(tmp_path / "t5.gguf", [("encoder.block.0.layer.0.SelfAttention.q.weight",
                                              lambda: torch.zeros(64, 64), "Q8_0"),
                                             ("shared.weight", lambda: torch.zeros(32, 64), "F16")], "t5encoder")
    with pytest.raises(ModelFileError, match="T5 text encoder, not a FLUX.1 transformer") as caught:
        load_flux(path)
    assert caught.value.found is FileKind.T5_TEXT


def test_full_width_rows_fall_back_as_the_quantizer_does():
    # FLUX.1's own widths are whole K blocks everywhere (3072, 12288, 15360): nothing falls back at full size.
    for key, shape in (("double_blocks.0.img_mlp.2.weight", (3072, 12288)),
                       ("single_blocks.0.linear2.weight", (3072, 15360)),
                       ("single_blocks.0.linear1.weight", (21504, 3072))):
        assert flux_gguf_type(key, shape, "Q4_K") == "Q4_K"


def test_write_flux_gguf_refuses_unknown_types(tmp_path):
    with pytest.raises(ValueError, match="Unknown GGUF type 'Q7_0'"):
        write_flux_gguf(tmp_path / "x.gguf", StateDictSource({}), "Q7_0")


class MetaGGUFSource:
    """The full-size FLUX.1 transformer as a GGUF file of `qtype` would hold it (ComfyUI-GGUF's layout), on the
    meta device: shapes, types and block bytes, no data."""

    def __init__(self, qtype: str) -> None:
        from comfyui_krea.model_loader.flux import FLUX_DEV, FluxTransformer
        from comfyui_krea.model_loader.gguf import QUANT_TYPES

        with torch.device("meta"):
            self.shapes = {k: tuple(v.shape) for k, v in FluxTransformer(FLUX_DEV).state_dict().items()}
        self.types = {k: QUANT_TYPES[flux_gguf_type(k, s, qtype)] for k, s in self.shapes.items()}

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]

    def dtype(self, key):
        return self.types[key].dense or torch.float32

    def quant_type(self, key):
        return None if self.types[key].dense is not None else self.types[key]

    def raw(self, key):
        rows, cols = self.shapes[key]
        return torch.empty(rows, self.types[key].row_bytes(cols), dtype=torch.uint8, device="meta")

    def tensor(self, key):
        return torch.empty(self.shapes[key], dtype=self.dtype(key), device="meta")


ROW_BYTES_AT_3072 = {"Q8_0": 3072 // 32 * 34, "Q4_K": 3072 // 256 * 144, "Q2_K": 3072 // 256 * 84}


@pytest.mark.parametrize("qtype, gigabytes", [("Q8_0", 12.71), ("Q4_K", 6.80), ("Q2_K", 4.02)])
def test_the_full_size_model_holds_its_blocks_as_the_memory_table_says(qtype, gigabytes):
    model = load_flux_from_source(MetaGGUFSource(qtype), device="meta", name=f"flux1-dev-{qtype}")
    layers = quantized_layers(model)
    assert len(layers) == 19 * 10 + 38 * 3  # every Linear of the blocks; embedders and final layer in BF16
    assert model.single_blocks[37].linear1.weight.shape == (21504, ROW_BYTES_AT_3072[qtype])
    held = sum(t.nbytes for t in model.state_dict().values())
    assert round(held / 1e9, 2) == gigabytes  # docs/gguf.md's table
