"""CLIP-L / T5 encoders: parity with transformers (down to T5's position buckets and layer norm), CLIP's pooled
end positions, every file layout, fp16 safety, the node, the errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.text_encoders import (
    T5EncoderConfig,
    load_clip_model,
    load_clip_tokenizer,
    load_t5_model,
    load_t5_tokenizer,
    load_text_encoders,
    write_random_clip_checkpoint,
    write_random_t5_checkpoint,
)
from comfyui_krea.model_loader.text_encoders.loading import weights_streamed_to
from comfyui_krea.model_loader.text_encoders.t5 import build_t5
from conftest import TINY_CLIP, TINY_T5, rel_err
from reference_tokenizers import TOKENIZERS, needs_tokenizers

PROMPTS = ["a photo of a cat sitting on a red chair, cinematic lighting", "",
           "text with <|endoftext|> inside and </s> too", "word " * 120]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {
        "clip": write_random_clip_checkpoint(root / "clip_l.safetensors", TINY_CLIP, seed=1),
        "t5": write_random_t5_checkpoint(root / "t5xxl.safetensors", TINY_T5, seed=2),
        "root": root,
    }


@pytest.fixture(scope="module")
def clip_ids():
    return load_clip_tokenizer(TOKENIZERS / "clip")(PROMPTS).ids


@pytest.fixture(scope="module")
def t5_ids():
    return load_t5_tokenizer(TOKENIZERS / "t5")(PROMPTS).ids


# --------------------------------------------------------------------------------------------------- parity

@needs_tokenizers
@pytest.mark.parametrize("eos_token_id", [49407, 2])  # current config value, and the legacy one of clip-vit-large
def test_clip_matches_transformers(files, clip_ids, eos_token_id):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=eos_token_id)
    reference = transformers.CLIPTextModel(config).eval()
    state = {k[len("text_model."):]: v for k, v in load_file(files["clip"]).items()
             if k.startswith("text_model.") and not k.endswith("position_ids")}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    with torch.no_grad():
        expected = reference(input_ids=clip_ids)
        hidden, pooled = load_clip_model(files["clip"])(clip_ids)
    assert rel_err(hidden, expected.last_hidden_state) < 1e-4
    assert rel_err(pooled, expected.pooler_output) < 1e-4
    # The prompt holding "<|endoftext|>" pools at that first end token, not at the one the tokenizer appended.
    assert (clip_ids[2] == 49407).nonzero()[0].item() < (clip_ids[0] == 49407).nonzero()[-1].item()


@needs_tokenizers
def test_t5_matches_transformers(files, t5_ids):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=32128, d_model=64, d_kv=16, num_heads=4, d_ff=96, num_layers=3, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)
    reference = transformers.T5EncoderModel(config).eval()
    state = load_file(files["t5"])
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    reference.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected = reference(input_ids=t5_ids).last_hidden_state
        ours = load_t5_model(files["t5"])(t5_ids)
    assert ours.dtype == torch.float32 and ours.shape == (len(PROMPTS), 512, 64)
    assert rel_err(ours, expected) < 1e-4


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (4, 6), (6, 9), (6, 2)])
def test_t5_relative_position_buckets_match_transformers(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    from comfyui_krea.model_loader.text_encoders.t5 import relative_position_buckets

    length = 40
    position = torch.arange(length)
    relative = position[None, :] - position[:, None]
    want = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=num_buckets,
                                                 max_distance=max_distance)
    assert torch.equal(relative_position_buckets(length, num_buckets, max_distance, torch.device("cpu")), want)


def test_t5_layer_norm_matches_transformers_on_small_activations():
    from transformers.models.t5.modeling_t5 import T5LayerNorm as Reference

    from comfyui_krea.model_loader.text_encoders.t5 import T5LayerNorm

    gen = torch.Generator().manual_seed(6)
    ours, theirs = T5LayerNorm(16, eps=1e-6), Reference(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, generator=gen))
        theirs.weight.copy_(ours.weight)
    x = 1e-3 * torch.randn(2, 5, 16, generator=gen)  # mean(x^2) ~ 1e-6: the epsilon counts
    assert torch.allclose(ours(x), theirs(x), rtol=1e-6, atol=0)


def test_clip_end_positions_per_row_with_and_without_an_end_token():
    from comfyui_krea.model_loader.text_encoders import CLIPTextConfig
    from comfyui_krea.model_loader.text_encoders.clip import build_clip

    config = CLIPTextConfig(width=64, layers=1, intermediate=64)
    with torch.device("meta"):
        model = build_clip(config)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    eos = config.eos_token_id
    ids = torch.tensor([[49406, 320, eos, eos], [5, 900, 12, 7], [49406, eos, 1, 1]])
    # row 0: first end token; row 1: none, so the highest id (900); row 2: first end token again
    assert model.end_positions(ids).tolist() == [2, 1, 1]


# --------------------------------------------------------------------------------------------------- layouts

def _clip_out(path, ids):
    with torch.no_grad():
        return load_clip_model(path)(ids)


def _t5_out(path, ids):
    with torch.no_grad():
        return load_t5_model(path)(ids)


def test_clip_layouts_load_to_identical_outputs(tmp_path, files):
    ids = torch.randint(0, 49406, (2, 77))
    ids[:, -1] = 49407
    hidden, pooled = _clip_out(files["clip"], ids)
    unprefixed = write_random_clip_checkpoint(tmp_path / "clip_t.safetensors", TINY_CLIP, seed=1,
                                              layout="transformers")
    diffusers = write_random_clip_checkpoint(tmp_path / "FLUX" / "text_encoder", TINY_CLIP, seed=1,
                                             layout="diffusers")
    for path in (unprefixed, diffusers, tmp_path / "FLUX"):  # the diffusers root picks text_encoder/
        h, p = _clip_out(path, ids)
        assert torch.equal(h, hidden) and torch.equal(p, pooled)
    other_seed = write_random_clip_checkpoint(tmp_path / "other.safetensors", TINY_CLIP, seed=5)
    assert not torch.equal(_clip_out(other_seed, ids)[1], pooled)


def test_t5_layouts_load_to_identical_outputs(tmp_path, files):
    ids = torch.randint(0, 32100, (2, 40))
    expected = _t5_out(files["t5"], ids)
    transformers_layout = write_random_t5_checkpoint(tmp_path / "t5_t.safetensors", TINY_T5, seed=2,
                                                     layout="transformers")
    diffusers = write_random_t5_checkpoint(tmp_path / "FLUX" / "text_encoder_2", TINY_T5, seed=2,
                                           layout="diffusers")
    shards = sorted(diffusers.glob("model-*.safetensors"))
    assert len(shards) == 2 and (diffusers / "model.safetensors.index.json").is_file()
    embed_tokens_only = tmp_path / "embed_tokens_only.safetensors"
    state = load_file(files["t5"])
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    save_file(state, str(embed_tokens_only))
    for path in (transformers_layout, diffusers, tmp_path / "FLUX", shards[0], embed_tokens_only):
        assert torch.equal(_t5_out(path, ids), expected), path


def test_t5_scaled_fp8_file(tmp_path, files):
    ids = torch.randint(0, 32100, (2, 40))
    fp8_path = write_random_t5_checkpoint(tmp_path / "t5_fp8_scaled.safetensors", TINY_T5, seed=2,
                                          dtype=torch.float16, layout="comfy_fp8_scaled")
    stored = load_file(fp8_path)
    assert stored["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float8_e4m3fn
    assert "encoder.block.0.layer.0.SelfAttention.q.scale_weight" in stored and "scaled_fp8" in stored
    # The same weights dequantized by hand into an ordinary float32 file give the same output.
    dequantized = {}
    for key, value in stored.items():
        if key.endswith(("scale_weight", "scale_input")) or key == "scaled_fp8":
            continue
        scale_key = key[: -len("weight")] + "scale_weight"
        dequantized[key] = value.float() * stored[scale_key] if scale_key in stored else value.float()
    save_file(dequantized, str(tmp_path / "dequantized.safetensors"))
    ours = _t5_out(fp8_path, ids)
    torch.testing.assert_close(ours, _t5_out(tmp_path / "dequantized.safetensors", ids), rtol=1e-5, atol=1e-5)
    # ...and stays near the unquantized model (e4m3 keeps 3 mantissa bits), but is not it.
    original = _t5_out(files["t5"], ids)
    assert 1e-4 < rel_err(ours, original) < 0.3


@needs_tokenizers
def test_fp16_stored_weights_compute_in_float32_on_cpu(tmp_path, files, clip_ids):
    ids = torch.randint(0, 32100, (1, 30))
    half = write_random_t5_checkpoint(tmp_path / "t5_fp16.safetensors", TINY_T5, seed=2, dtype=torch.float16)
    model = load_t5_model(half)
    assert model.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype == torch.float16  # no upcast copy
    with torch.no_grad():
        out = model(ids)
    assert out.dtype == torch.float32 and rel_err(out, _t5_out(files["t5"], ids)) < 5e-3
    clip_half = write_random_clip_checkpoint(tmp_path / "clip_fp16.safetensors", TINY_CLIP, seed=1,
                                             dtype=torch.float16)
    assert rel_err(_clip_out(clip_half, clip_ids[:1])[1], _clip_out(files["clip"], clip_ids[:1])[1]) < 5e-3


# ------------------------------------------------------------------------------------------------ fp16 safety

def test_t5_in_fp16_stays_finite_where_fp16_overflows(tmp_path):
    config = T5EncoderConfig(d_model=64, d_kv=16, heads=4, d_ff=96, layers=2)
    path = write_random_t5_checkpoint(tmp_path / "hot.safetensors", config, seed=3)
    state = load_file(path)
    for key in state:  # T5-XXL-like: feed-forward activations far beyond fp16's 65504
        if "wi_0" in key or "wi_1" in key:
            state[key] = state[key] * 40.0
        if key.endswith("wo.weight"):
            state[key] = state[key] * 30.0
    save_file(state, str(path))
    model = load_t5_model(path)
    ids = torch.randint(0, 32100, (2, 24))
    ff = model.encoder.block[0].layer[1]
    x = ff.layer_norm(model.shared.weight[ids].float())
    gate = F.gelu(ff.DenseReluDense.wi_0(x), approximate="tanh") * ff.DenseReluDense.wi_1(x)
    assert gate.abs().max() > 65504 or ff.DenseReluDense.wo(gate).abs().max() > 65504
    half_gate = (F.gelu(ff.DenseReluDense.wi_0(x.half()), approximate="tanh") * ff.DenseReluDense.wi_1(x.half()))
    assert not torch.isfinite(ff.DenseReluDense.wo(half_gate)).all()  # a plain fp16 pass overflows
    with torch.no_grad():
        full = model(ids, torch.float32)
        half = model(ids, torch.float16)
        bf16 = model(ids, torch.bfloat16)
    assert torch.isfinite(half).all() and torch.isfinite(bf16).all()
    assert rel_err(half, full) < 1e-2 and rel_err(bf16, full) < 5e-2


# -------------------------------------------------------------------------------------------- the full encoder

@needs_tokenizers
def test_encode_shapes_batching_and_empty_prompt(files):
    encoders = load_text_encoders(files["clip"], files["t5"], TOKENIZERS, torch.device("cpu"))
    sequence, pooled = encoders.encode(PROMPTS[:3])
    assert sequence.shape == (3, 512, 64) and pooled.shape == (3, 128)
    assert sequence.dtype == pooled.dtype == torch.float32 and sequence.device.type == pooled.device.type == "cpu"
    alone_sequence, alone_pooled = encoders.encode([""])
    torch.testing.assert_close(alone_sequence[0], sequence[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone_pooled[0], pooled[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])


def test_streamed_parts_cover_every_weight_but_the_tables(files):
    for model, tables in ((load_clip_model(files["clip"]), {"text_model.embeddings.token_embedding.weight",
                                                            "text_model.embeddings.position_embedding.weight"}),
                          (load_t5_model(files["t5"]), {"shared.weight"})):
        streamed = {id(p) for part in model.streamed_parts() for p in part.parameters()}
        outside = {name for name, p in model.named_parameters() if id(p) not in streamed}
        assert outside == tables


def test_weights_visit_the_device_only_while_their_part_runs(files):
    # "meta" stands in for a GPU: each layer runs there, and the CPU (memory-mapped) tensors come back after.
    model = load_clip_model(files["clip"])
    layer = model.text_model.encoder.layers[0]
    before = {name: p for name, p in layer.named_parameters()}
    seen = {}

    def record_device(module, args) -> None:
        seen["d"] = module.weight.device

    handle = layer.self_attn.q_proj.register_forward_pre_hook(record_device)
    with weights_streamed_to(torch.device("meta"), model.streamed_parts()):
        out = layer(torch.empty(1, 5, 128, device="meta"))
        assert out.device.type == "meta" and seen["d"].type == "meta"
        assert all(p is before[name] for name, p in layer.named_parameters())
        with pytest.raises(RuntimeError):  # a CPU input against meta weights fails inside the part...
            layer(torch.zeros(1, 5, 128))
    handle.remove()
    assert all(p is before[name] for name, p in layer.named_parameters())  # ...and the weights still come back
    assert all(p.device.type == "cpu" for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ node

@needs_tokenizers
def test_node_returns_flux_conditioning(files, host_state):
    from comfyui_krea.nodes.host import TextEncoderHandle
    from comfyui_krea.nodes.text import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, KreaTextEncode

    assert NODE_CLASS_MAPPINGS == {"KreaTextEncode": KreaTextEncode}
    assert NODE_DISPLAY_NAME_MAPPINGS["KreaTextEncode"] == "Krea Text Encode"
    assert KreaTextEncode.CATEGORY == "Krea/conditioning" and KreaTextEncode.RETURN_TYPES == ("CONDITIONING",)
    inputs = KreaTextEncode.INPUT_TYPES()["required"]
    assert inputs["text_encoder"][0] == "CLIP"
    assert inputs["prompt"][0] == "STRING" and inputs["prompt"][1]["multiline"] and inputs["prompt"][1]["default"] == ""

    handle = TextEncoderHandle(files["clip"], files["t5"], TOKENIZERS, torch.device("cpu"))
    for prompt in ("a cat", ""):
        (conditioning,) = getattr(KreaTextEncode(), KreaTextEncode.FUNCTION)(text_encoder=handle, prompt=prompt)
        assert isinstance(conditioning, list) and len(conditioning) == 1 and len(conditioning[0]) == 2
        sequence, extras = conditioning[0]
        assert sequence.shape == (1, 512, 64) and sequence.dtype == torch.float32
        assert sequence.device.type == "cpu"
        assert list(extras) == ["pooled_output"]
        assert extras["pooled_output"].shape == (1, 128) and extras["pooled_output"].dtype == torch.float32


@needs_tokenizers
def test_node_uses_comfyui_tokenizers_when_none_is_named(tmp_path, files, monkeypatch, host_state):
    import shutil

    from comfyui_krea.nodes import text
    from comfyui_krea.nodes.host import ModelSlot

    comfy = tmp_path / "comfy"
    shutil.copytree(TOKENIZERS / "clip", comfy / "sd1_tokenizer")
    shutil.copytree(TOKENIZERS / "t5", comfy / "text_encoders" / "t5_tokenizer")
    monkeypatch.setattr(host_state, "shipped_tokenizer_dirs", lambda: {
        "clip": comfy / "sd1_tokenizer", "t5": comfy / "text_encoders" / "t5_tokenizer"})
    handle = host_state.text_encoder_model(files["clip"], files["t5"], ModelSlot())  # no tokenizer folder named
    (conditioning,) = text.KreaTextEncode().encode(handle, "a cat")
    assert conditioning[0][0].shape == (1, 512, 64)


# ----------------------------------------------------------------------------------------------------- errors

def _fake(path: Path, keys: list[str]) -> Path:
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


def test_missing_file(tmp_path, files):
    with pytest.raises(ModelFileError, match="not found"):
        load_text_encoders(tmp_path / "nope.safetensors", files["t5"], TOKENIZERS, torch.device("cpu"))
    with pytest.raises(ModelFileError, match="nope_t5"):
        load_text_encoders(files["clip"], tmp_path / "nope_t5.safetensors", TOKENIZERS, torch.device("cpu"))


def test_files_of_other_models_are_named(tmp_path, files):
    flux = _fake(tmp_path / "flux1-krea-dev.safetensors",
                 ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"])
    vae = _fake(tmp_path / "ae.safetensors",
                ["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"])
    with pytest.raises(ModelFileError, match="not a CLIP text encoder.*FLUX transformer"):
        load_clip_model(flux)
    with pytest.raises(ModelFileError, match="not a T5 text encoder.*VAE"):
        load_t5_model(vae)
    with pytest.raises(ModelFileError, match="not a T5 text encoder.*CLIP text encoder.*CLIP file"):
        load_t5_model(files["clip"])
    with pytest.raises(ModelFileError, match="not a CLIP text encoder.*T5 text encoder.*T5 file"):
        load_clip_model(files["t5"])


def test_incomplete_or_old_t5_files(tmp_path, files):
    state = load_file(files["t5"])
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(state, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(ModelFileError, match="lacks 1 of the .*wo.weight"):
        load_t5_model(tmp_path / "incomplete.safetensors")
    old = {k.replace("wi_0", "wi"): v for k, v in load_file(files["t5"]).items() if "wi_1" not in k}
    save_file(old, str(tmp_path / "t5_v1_0.safetensors"))
    with pytest.raises(ModelFileError, match="T5 v1.0"):
        load_t5_model(tmp_path / "t5_v1_0.safetensors")


def test_missing_tokenizer_files(tmp_path, files):
    # Model files in a folder with no tokenizers anywhere near, and no tokenizer folder named.
    with pytest.raises(ModelFileError, match="No CLIP tokenizer.*No T5 tokenizer") as info:
        load_text_encoders(files["clip"], files["t5"], None, torch.device("cpu"))
    assert str(files["root"].parent / "tokenizer") in str(info.value)
    (tmp_path / "tok" / "clip").mkdir(parents=True)
    with pytest.raises(ModelFileError, match="looked in: .*tok"):
        load_text_encoders(files["clip"], files["t5"], tmp_path / "tok", torch.device("cpu"))


def test_t5_config_is_read_off_the_shapes(files):
    model = load_t5_model(files["t5"])
    assert model.config == TINY_T5
    assert load_clip_model(files["clip"]).config == TINY_CLIP
    assert build_t5(TINY_T5).shared.weight.device.type == "meta"
