"""Encoder-only T5 GGUF files (llama.cpp's tensor names, as t5xxl GGUFs carry them): recognised as T5, loaded
with their Linear weights kept as blocks, equal to the encoder holding gguf's own numpy dequantization, and
listed and accepted as the loader's T5 file.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF support needs the gguf package: pip install -e '.[test]'")

from comfyui_krea.model_loader import FileKind, identify, open_checkpoint  # noqa: E402
from comfyui_krea.model_loader.checkpoints import save_tensors  # noqa: E402
from comfyui_krea.model_loader.gguf.writing import write_gguf  # noqa: E402
from comfyui_krea.model_loader.operations import QuantizedLinear  # noqa: E402
from comfyui_krea.model_loader.text_encoders import (  # noqa: E402
    T5EncoderConfig,
    load_t5_model,
    write_random_t5_checkpoint,
)
from comfyui_krea.model_loader.text_encoders.t5 import llama_cpp_name, transformers_name  # noqa: E402
from comfyui_krea.nodes import model_files  # noqa: E402

CONFIG = T5EncoderConfig(vocab_size=320, d_model=64, d_kv=16, heads=4, d_ff=96, layers=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random T5 as safetensors, the same weights as a Q8_0 GGUF in llama.cpp's names (norms and the relative
    attention bias in F32, as llama.cpp's quantizer leaves them), and the oracle: gguf's numpy dequantization."""
    folder = tmp_path_factory.mktemp("t5_gguf")
    source = open_checkpoint(write_random_t5_checkpoint(folder / "t5.safetensors", CONFIG, seed=6))
    entries = [(llama_cpp_name(k), lambda k=k: source.tensor(k),
                "Q8_0" if len(source.shape(k)) == 2 and "relative_attention_bias" not in k else "F32")
               for k in source.keys()]
    path = write_gguf(folder / "t5-v1_1-xxl-encoder-Q8_0.gguf", entries, "t5encoder")
    oracle = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        oracle[transformers_name(t.name)] = torch.from_numpy(values.reshape(tuple(reversed(t.shape.tolist()))).copy())
    oracle["shared.weight"] = oracle["shared.weight"].half()  # the loader keeps a dequantized embedding in fp16
    return path, save_tensors(folder / "oracle.safetensors", oracle)


def test_the_names_map_both_ways():
    assert transformers_name("enc.blk.3.attn_rel_b.weight") == \
        "encoder.block.3.layer.0.SelfAttention.relative_attention_bias.weight"
    assert transformers_name("enc.output_norm.weight") == "encoder.final_layer_norm.weight"
    assert transformers_name("token_embd.weight") == "shared.weight"
    assert llama_cpp_name("encoder.block.1.layer.1.DenseReluDense.wi_0.weight") == "enc.blk.1.ffn_gate.weight"


def test_a_t5_gguf_loads_with_its_linears_quantized_and_equals_the_dequantized_oracle(files):
    path, oracle_path = files
    assert identify(open_checkpoint(path).keys()) is FileKind.T5_TEXT
    model = load_t5_model(path)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.quant_type is not None]
    assert len(quantized) == 7 * CONFIG.layers  # q, k, v, o, wi_0, wi_1, wo per block
    assert model.shared.weight.dtype == torch.float16  # the Q8_0 token table, dequantized once
    oracle = load_t5_model(oracle_path)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), oracle(ids))


def test_the_loader_lists_and_accepts_a_t5_gguf_as_the_t5_file(files, host_state):
    path = files[0]
    folder = path.parent.parent / "models_t5_gguf"
    (folder / "text_encoders").mkdir(parents=True, exist_ok=True)
    (folder / "text_encoders" / path.name).write_bytes(path.read_bytes())
    host_state.configure(models_dir=folder)
    from comfyui_krea.nodes.host import host

    assert path.name in host.list_models("text_encoders")
    model_files.check_model_file("text_encoders", path.name, model_files.T5, "t5_name")
    with pytest.raises(ValueError, match="is a T5 text encoder, not a CLIP"):
        model_files.check_model_file("text_encoders", path.name, model_files.CLIP, "clip_name")
