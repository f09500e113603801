"""Loading FLUX transformer files: layouts, config inference, strict keys, fp8 storage and bad files."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.checkpoints import Checkpoint, StateDictSource
from comfyui_krea.model_loader.compute_dtypes import flux_compute_dtype
from comfyui_krea.model_loader.flux import (
    FLUX_DEV,
    WEIGHT_DTYPES,
    FluxConfig,
    FluxTransformer,
    RandomFluxSource,
    load_flux,
    load_flux_from_source,
    write_random_flux_checkpoint,
)
from comfyui_krea.model_loader.flux import config_from_checkpoint as flux_config_from_checkpoint
from comfyui_krea.model_loader.flux.layouts import COMFY_PREFIX, rope_axes_for_head_dim
from comfyui_krea.model_loader.operations import CastLinear
from conftest import TINY_FLUX, rel_err


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory):
    return write_random_flux_checkpoint(tmp_path_factory.mktemp("flux") / "bfl.safetensors", TINY_FLUX, seed=7)


def inputs(batch: int = 2, h: int = 3, w: int = 4, txt_len: int = 5, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(11)
    ids = torch.zeros(batch, h * w, 3)
    ids[..., 1] = (torch.arange(h * w) // w).float()
    ids[..., 2] = (torch.arange(h * w) % w).float()
    return dict(img=torch.randn(batch, h * w, 64, generator=gen).to(dtype), img_ids=ids,
                txt=torch.randn(batch, txt_len, 32, generator=gen).to(dtype), txt_ids=torch.zeros(batch, txt_len, 3),
                timesteps=torch.linspace(0.2, 0.9, batch), y=torch.randn(batch, 16, generator=gen).to(dtype),
                guidance=torch.full((batch,), 4.5))


def run(model: FluxTransformer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_orig(**inputs(dtype=dtype)).float()


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ layouts


def test_config_inferred_from_shapes(bfl_file):
    assert flux_config_from_checkpoint(Checkpoint(bfl_file)) == TINY_FLUX
    assert rope_axes_for_head_dim(128) == FLUX_DEV.axes_dim
    model = load_flux(bfl_file)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(isinstance(m, CastLinear) for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("layout", ["comfy", "diffusers_file", "diffusers_folder", "diffusers_transformer_dir"])
def test_every_layout_loads_to_identical_outputs(tmp_path, bfl_file, layout):
    if layout == "comfy":
        path = write_random_flux_checkpoint(tmp_path / "c.safetensors", TINY_FLUX, seed=7, layout="comfy")
    elif layout == "diffusers_file":
        path = write_random_flux_checkpoint(tmp_path / "d.safetensors", TINY_FLUX, seed=7, layout="diffusers")
    else:
        path = write_random_flux_checkpoint(tmp_path / "model", TINY_FLUX, seed=7, layout="diffusers")
        assert len(list((path / "transformer").glob("*.safetensors"))) == 2
        if layout == "diffusers_transformer_dir":
            path = path / "transformer"
    assert flux_config_from_checkpoint(path) == TINY_FLUX
    assert torch.equal(run(load_flux(path)), run(load_flux(bfl_file)))
    assert not list(tmp_path.rglob("*.partial"))


def test_other_seed_gives_other_output(tmp_path, bfl_file):
    other = write_random_flux_checkpoint(tmp_path / "o.safetensors", TINY_FLUX, seed=8)
    assert rel_err(run(load_flux(other)), run(load_flux(bfl_file))) > 0.1


def test_comfy_scaled_fp8_equals_dequantised_model(tmp_path):
    path = write_random_flux_checkpoint(tmp_path / "fp8.safetensors", TINY_FLUX, seed=7, layout="comfy_fp8_scaled")
    ckpt = Checkpoint(path)
    assert COMFY_PREFIX + "scaled_fp8" in ckpt.keys()
    # Reference: a plain float32 BFL file holding weight * scale_weight, made here from the raw file.
    dequantised = {}
    for key in ckpt.keys():
        short = key[len(COMFY_PREFIX):]
        if short == "scaled_fp8" or short.endswith(".scale_weight"):
            continue
        t = ckpt.tensor(key).float()
        scale_key = key.removesuffix(".weight") + ".scale_weight"
        if scale_key in ckpt.keys():
            assert ckpt.dtype(key) == torch.float8_e4m3fn
            t = t * ckpt.tensor(scale_key).float()
        dequantised[short] = t.contiguous()
    save_file(dequantised, str(tmp_path / "ref.safetensors"))
    model = load_flux(path)  # "default": fp8 stays fp8
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.scale_weight is not None
    assert model.compute_dtype == torch.float32  # on the CPU; the GPU rule: test_compute_dtype_follows_device
    assert rel_err(run(model), run(load_flux(tmp_path / "ref.safetensors"))) < 1e-5
    # Scales stored as shape (1,) instead of () load the same.
    state = {k: ckpt.tensor(k) for k in ckpt.keys()}
    state = {k: (v.reshape(1) if k.endswith(".scale_weight") else v) for k, v in state.items()}
    assert torch.equal(run(load_flux_from_source(StateDictSource(state))), run(model))


def test_bundle_with_vae_and_text_encoders_loads_the_transformer(tmp_path, bfl_file):
    ckpt = Checkpoint(bfl_file)
    state = {COMFY_PREFIX + k: ckpt.tensor(k) for k in ckpt.keys()}
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(4, 3, 3, 3)
    state["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.zeros(4)
    assert torch.equal(run(load_flux_from_source(StateDictSource(state))), run(load_flux(bfl_file)))


def test_model_without_guidance_embedding(tmp_path):
    config = FluxConfig(**{**TINY_FLUX.__dict__, "guidance_embed": False, "depth": 1, "depth_single_blocks": 0})
    path = write_random_flux_checkpoint(tmp_path / "schnell.safetensors", config)
    assert flux_config_from_checkpoint(Checkpoint(path)) == config
    assert torch.isfinite(run(load_flux(path))).all()


# ------------------------------------------------------------------------------------- full-size key set


def bfl_reference_keys(depth: int, single: int) -> dict[str, tuple[int, ...]]:
    """The BFL release's key set and shapes, written out by hand from the published layout."""
    h, mlp = 3072, 12288
    keys: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_in: int, n_out: int) -> None:
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (n_out, n_in), (n_out,)

    linear("img_in", 64, h)
    linear("txt_in", 4096, h)
    for emb, n_in in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        linear(f"{emb}.in_layer", n_in, h)
        linear(f"{emb}.out_layer", h, h)
    for i in range(depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}_"
            linear(b + "mod.lin", h, 6 * h)
            linear(b + "attn.qkv", h, 3 * h)
            linear(b + "attn.proj", h, h)
            linear(b + "mlp.0", h, mlp)
            linear(b + "mlp.2", mlp, h)
            keys[b + "attn.norm.query_norm.scale"] = keys[b + "attn.norm.key_norm.scale"] = (128,)
    for i in range(single):
        b = f"single_blocks.{i}."
        linear(b + "linear1", h, 3 * h + mlp)
        linear(b + "linear2", h + mlp, h)
        linear(b + "modulation.lin", h, 3 * h)
        keys[b + "norm.query_norm.scale"] = keys[b + "norm.key_norm.scale"] = (128,)
    linear("final_layer.linear", h, 64)
    linear("final_layer.adaLN_modulation.1", h, 2 * h)
    return keys


@pytest.fixture(scope="module")
def meta_flux_dev_state():
    with torch.device("meta"):
        return FluxTransformer(FLUX_DEV).state_dict()


def test_full_size_keys_match_bfl_release(meta_flux_dev_state):
    ours = {k: tuple(v.shape) for k, v in meta_flux_dev_state.items()}
    assert ours == bfl_reference_keys(19, 38)
    assert len(ours) == 780
    assert sum(v.numel() for v in meta_flux_dev_state.values()) == 11_901_408_320  # the 12B of FLUX.1-dev


def test_full_size_keys_convert_to_diffusers_model(meta_flux_dev_state):
    """diffusers' own BFL->diffusers converter consumes exactly our keys and yields its model's state dict."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = {COMFY_PREFIX + k: v for k, v in meta_flux_dev_state.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(state)
    assert state == {}  # every key consumed
    with torch.device("meta"):
        reference = FluxTransformer2DModel(guidance_embeds=True).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    # ... and our loader reads that diffusers layout back to FLUX.1-dev.
    assert flux_config_from_checkpoint(reference) == FLUX_DEV
    load_flux_from_source(StateDictSource(reference), device="meta")


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_full_size_loads_strictly_from_meta_state(meta_flux_dev_state, prefix):
    state = {prefix + k: v for k, v in meta_flux_dev_state.items()}
    assert flux_config_from_checkpoint(state) == FLUX_DEV
    model = load_flux_from_source(StateDictSource(state), device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == bfl_reference_keys(19, 38)


def test_full_size_fp8_halves_weight_memory(meta_flux_dev_state):
    state = {k: v.to(torch.bfloat16) for k, v in meta_flux_dev_state.items()}
    bf16 = load_flux_from_source(StateDictSource(state), "bf16", device="meta")
    fp8 = load_flux_from_source(StateDictSource(state), "fp8_e4m3fn", device="meta")
    ratio = param_bytes(fp8) / param_bytes(bf16)
    assert param_bytes(bf16) == 2 * 11_901_408_320
    assert 0.5 < ratio < 0.51, ratio
    assert fp8.single_blocks[5].linear1.weight.dtype == torch.float8_e4m3fn
    assert fp8.img_in.weight.dtype == torch.bfloat16 and fp8.double_blocks[0].img_mod.lin.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_strict_keys(meta_flux_dev_state, change):
    state = dict(meta_flux_dev_state)
    if change == "missing":
        del state["double_blocks.7.txt_mlp.2.bias"]
    elif change == "extra":
        state["double_blocks.3.img_attn.extra.weight"] = torch.empty(3, device="meta")
    else:
        state["single_blocks.2.linear2.weight"] = torch.empty(3072, 100, device="meta")
    with pytest.raises(ModelFileError, match={"missing": "missing", "extra": "does not have",
                                              "shape": "wrong shape"}[change]) as err:
        load_flux_from_source(StateDictSource(state), device="meta", name="my_flux.safetensors")
    assert "my_flux.safetensors" in str(err.value)


# --------------------------------------------------------------------------------------------- fp8 storage


def test_fp8_storage_is_within_bf16_error(bfl_file):
    reference = run(load_flux(bfl_file))  # float32
    bf16 = load_flux(bfl_file, "bf16")
    fp8 = load_flux(bfl_file, "fp8_e4m3fn")
    assert bf16.compute_dtype == fp8.compute_dtype == torch.float32
    out_bf16, out_fp8 = run(bf16, torch.bfloat16), run(fp8, torch.bfloat16)
    bf16_error = rel_err(out_bf16, reference)
    assert bf16_error < 0.02
    # Storage in fp8 computes exactly what a bf16 model holding the dequantised weights computes.
    state = {k: v.float() for k, v in fp8.state_dict().items()}
    for name, module in fp8.named_modules():
        if isinstance(module, CastLinear) and module.scale_weight is not None:
            state[name + ".weight"] = module.weight.float() * module.scale_weight.float()
    dequantised = load_flux_from_source(StateDictSource(state), "bf16")
    assert rel_err(out_fp8, run(dequantised, torch.bfloat16)) < 2 * bf16_error
    assert rel_err(out_fp8, reference) < 0.08  # fp8's own rounding (3 mantissa bits)
    # Block weights stored in fp8, the rest in bf16: weight bytes fall to (blocks/2 + rest).
    block_linear = sum(p.numel() for n, p in bf16.named_parameters()
                       if n.startswith(("double_blocks", "single_blocks")) and n.endswith("weight") and p.ndim == 2)
    assert param_bytes(fp8) == param_bytes(bf16) - block_linear
    assert param_bytes(fp8) < 0.65 * param_bytes(bf16)


def test_fp8_fast_flag(bfl_file, monkeypatch, caplog):
    from comfyui_krea.model_loader.flux import loading as flux_loading

    # No fp8 matrix units on CPU: one warning, and the same numbers as fp8_e4m3fn.
    with caplog.at_level(logging.WARNING):
        fast = load_flux(bfl_file, "fp8_e4m3fn_fast")
    assert any("has no fp8 matrix units" in r.message for r in caplog.records)
    assert not any(m.fast_fp8 for m in fast.modules() if isinstance(m, CastLinear))
    assert torch.equal(run(fast, torch.bfloat16), run(load_flux(bfl_file, "fp8_e4m3fn"), torch.bfloat16))
    # Where the device has them, every fp8 Linear of the blocks multiplies in fp8.
    monkeypatch.setattr(flux_loading, "fp8_matmul_supported", lambda device: True)
    fast = load_flux(bfl_file, "fp8_e4m3fn_fast")
    assert fast.single_blocks[0].linear1.fast_fp8 and fast.double_blocks[1].txt_mlp[0].fast_fp8


def test_fp16_and_default_dtypes(tmp_path):
    path = write_random_flux_checkpoint(tmp_path / "bf16.safetensors", TINY_FLUX, dtype=torch.bfloat16)
    default = load_flux(path)
    assert default.txt_in.weight.dtype == torch.bfloat16
    fp16 = load_flux(path, "fp16")
    assert fp16.single_blocks[0].linear2.weight.dtype == torch.float16
    assert rel_err(run(fp16, torch.float16), run(default, torch.bfloat16)) < 0.03


def test_compute_dtype_follows_device(bfl_file):
    # The loader decides what the model computes in for its device: float32 on the CPU whatever the storage;
    # on a GPU fp16 when asked for or stored so, else bf16 (fp8 and float32 storage too).
    assert load_flux(bfl_file, "bf16").compute_dtype == torch.float32
    cuda = torch.device("cuda")
    assert flux_compute_dtype(cuda, "default", torch.bfloat16) == torch.bfloat16
    assert flux_compute_dtype(cuda, "default", torch.float16) == torch.float16
    assert flux_compute_dtype(cuda, "default", torch.float8_e4m3fn) == torch.bfloat16
    assert flux_compute_dtype(cuda, "default", torch.float32) == torch.bfloat16
    assert flux_compute_dtype(cuda, "fp16", torch.bfloat16) == torch.float16
    assert flux_compute_dtype(cuda, "bf16", torch.float16) == torch.bfloat16
    assert flux_compute_dtype(cuda, "fp8_e4m3fn", torch.float16) == torch.bfloat16


def test_unknown_weight_dtype_lists_choices(bfl_file):
    with pytest.raises(ValueError) as err:
        load_flux(bfl_file, "fp32")
    assert not isinstance(err.value, ModelFileError)
    assert all(choice in str(err.value) for choice in WEIGHT_DTYPES)


# ---------------------------------------------------------------------------------------------- bad files

OTHER_MODELS = {
    "sdxl_unet": (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"], "UNet"),
    "sdxl_full": (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
                   "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"], "full checkpoint"),
    "vae": (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "VAE"),
    "lora": (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
              "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"], "LoRA"),
    "kohya_lora": (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                    "lora_unet_double_blocks_0_img_attn_qkv.alpha"], "LoRA"),
    "clip": (["text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.weight"], "CLIP"),
    "t5": (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "T5"),
    "unknown": (["foo.weight", "bar.bias"], "not a FLUX.1 transformer"),
}


@pytest.mark.parametrize("kind", sorted(OTHER_MODELS))
def test_other_model_files_are_named(tmp_path, kind):
    keys, expected = OTHER_MODELS[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    with pytest.raises(ModelFileError, match=expected) as err:
        load_flux(path)
    assert str(path) in str(err.value)


def test_truncated_download(tmp_path, bfl_file):
    path = tmp_path / "cut.safetensors"
    data = bfl_file.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="truncated") as err:
        load_flux(path)
    assert str(path) in str(err.value)


def test_not_safetensors(tmp_path):
    path = tmp_path / "flux.ckpt"
    path.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        load_flux(path)


def test_diffusers_folder_with_missing_shard(tmp_path):
    root = write_random_flux_checkpoint(tmp_path / "model", TINY_FLUX, layout="diffusers")
    index = json.loads((root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (root / "transformer" / lost).unlink()
    with pytest.raises(ModelFileError, match=lost):
        load_flux(root)


def test_random_source_builds_the_model_the_random_file_holds(tmp_path):
    # The benchmarks' in-memory random weights go through the same conversion as a file would.
    path = write_random_flux_checkpoint(tmp_path / "r.safetensors", TINY_FLUX, seed=3, dtype=torch.bfloat16)
    for weight_dtype in ("default", "fp8_e4m3fn"):
        from_file = load_flux(path, weight_dtype)
        from_source = load_flux_from_source(RandomFluxSource(TINY_FLUX, seed=3), weight_dtype)
        assert from_source.compute_dtype == from_file.compute_dtype == torch.float32
        a, b = from_file.state_dict(), from_source.state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()) for k in a)


def test_default_keeps_each_tensors_own_dtype(tmp_path):
    # Outside ComfyUI "default" keeps a mixed file as it is stored (bf16 weights, float32 norm scales here);
    # only a host's choice (default_dtype, inside ComfyUI) converts it.
    path = write_random_flux_checkpoint(tmp_path / "bf16.safetensors", TINY_FLUX, dtype=torch.bfloat16)
    state = {k: (v.float() if k.endswith(".scale") else v) for k, v in load_file(str(path)).items()}
    save_file(state, str(tmp_path / "mixed.safetensors"))
    model = load_flux(tmp_path / "mixed.safetensors")
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16
    chosen = load_flux(tmp_path / "mixed.safetensors", default_dtype=lambda stored: torch.float32)
    assert chosen.double_blocks[0].img_attn.qkv.weight.dtype == torch.float32
