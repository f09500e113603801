"""The weight storage a FLUX load decides, and each tensor as it is stored: the storage dtype, compute dtype, fp8
scaling and fast fp8 path follow the file's dtypes and weight_dtype (the blocks' weights decide, the host's default
dtype applies to `default` only); scaled fp8 files hold weight x scale when loaded as 16-bit, and fp8 storage
quantizes the block linears after applying the file's scale."""
from __future__ import annotations

import pytest
import torch

from comfyui_krea.model_loader import operations
from comfyui_krea.model_loader.checkpoints import StateDictSource
from comfyui_krea.model_loader.flux import load_flux_from_source
from conftest import TINY_FLUX, flux_shapes

# ------------------------------------------- the weight storage a load decides (what picks the layer classes)

def _flux_state(dtype: torch.dtype, others: torch.dtype | None = None, block_bias: torch.dtype | None = None) -> dict:
    """A tiny FLUX state dict: blocks' weights in `dtype`; the other tensors in `others`, listed first (as a
    file may order them), and the blocks' biases in `block_bias`, ahead of the block weights."""
    shapes = flux_shapes(TINY_FLUX)
    state = {}
    for k in sorted(shapes, key=lambda k: (k.startswith(("double_blocks.", "single_blocks.")), k.endswith("weight"))):
        in_blocks = k.startswith(("double_blocks.", "single_blocks."))
        kind = dtype if in_blocks and k.endswith("weight") else \
            (block_bias or dtype) if in_blocks else (others or dtype)
        state[k] = (torch.randn(shapes[k], generator=torch.Generator().manual_seed(len(state))) * 0.02).to(kind)
    return state


def _storage_seen(state: dict, weight_dtype: str, **load) -> tuple:
    seen = []

    def record(storage):
        seen.append(storage)
        return operations.CastOps

    model = load_flux_from_source(StateDictSource(state), weight_dtype, operations=record, **load)
    (storage,) = seen
    assert (model.storage_dtype, model.compute_dtype) == (storage.dtype, storage.compute_dtype)
    return storage.dtype, storage.compute_dtype, storage.scaled, storage.fast_fp8


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("file_dtype, weight_dtype, expected", [
    (torch.bfloat16, "default", (torch.bfloat16, torch.bfloat16, False, False)),
    (torch.float16, "default", (torch.float16, torch.float16, False, False)),
    (torch.float32, "default", (torch.float32, torch.bfloat16, False, False)),
    (torch.bfloat16, "fp16", (torch.float16, torch.float16, False, False)),
    (torch.float16, "bf16", (torch.bfloat16, torch.bfloat16, False, False)),
    (torch.bfloat16, "fp8_e4m3fn", (FP8, torch.bfloat16, True, False)),
    (torch.bfloat16, "fp8_e4m3fn_fast", (FP8, torch.bfloat16, True, True)),
    (FP8, "default", (FP8, torch.bfloat16, False, False)),  # plain fp8 weights: no scales in the file
])
def test_the_storage_a_load_decides(fake_cuda, file_dtype, weight_dtype, expected):
    # Built on the CPU for a (pretend) GPU: the compute dtype is the GPU's (on the CPU it is always float32).
    fake_cuda(capability=(9, 0))
    others = torch.float32 if file_dtype == FP8 else None  # fp8 files keep their small tensors wider
    got = _storage_seen(_flux_state(file_dtype, others=others), weight_dtype, compute_device=torch.device("cuda"))
    assert got == expected


def test_the_blocks_weights_decide_not_the_tensors_before_them(fake_cuda):
    """Other tensors and the blocks' biases in float32 come first in the file; the blocks' bf16 weights decide."""
    fake_cuda(capability=(9, 0))
    state = _flux_state(torch.bfloat16, others=torch.float32, block_bias=torch.float32)
    assert _storage_seen(state, "default", compute_device=torch.device("cuda"))[:2] == (torch.bfloat16,
                                                                                         torch.bfloat16)


def test_the_hosts_default_dtype_applies_to_default_only(fake_cuda):
    fake_cuda(capability=(9, 0))
    asked = []

    def host_choice(stored):  # ComfyUI: its unet dtype for the device (here: fp16 for anything)
        asked.append(stored)
        return torch.float16

    state = _flux_state(torch.bfloat16)
    assert _storage_seen(state, "default", compute_device=torch.device("cuda"), default_dtype=host_choice) == \
        (torch.float16, torch.float16, False, False)
    assert asked == [torch.bfloat16]
    assert _storage_seen(state, "bf16", compute_device=torch.device("cuda"), default_dtype=host_choice)[0] == \
        torch.bfloat16
    fp8_state = _flux_state(FP8, others=torch.float32)
    assert _storage_seen(fp8_state, "default", compute_device=torch.device("cuda"), default_dtype=host_choice)[0] \
        == FP8  # fp8 files stay fp8: the host's choice is for wide weights
    assert asked == [torch.bfloat16]


def test_a_scaled_fp8_file_is_stored_scaled(fake_cuda, tmp_path):
    from comfyui_krea.model_loader.flux import load_flux, write_random_flux_checkpoint

    fake_cuda(capability=(9, 0))
    path = write_random_flux_checkpoint(tmp_path / "scaled.safetensors", TINY_FLUX, dtype=torch.bfloat16,
                                        layout="comfy_fp8_scaled")
    seen = []
    load_flux(path, "default", compute_device=torch.device("cuda"),
              operations=lambda storage: seen.append(storage) or operations.CastOps)
    assert [(s.dtype, s.compute_dtype, s.scaled, s.fast_fp8) for s in seen] == [(FP8, torch.bfloat16, True, False)]


# ------------------------------------------------------------------------ scaled fp8 files, converted on load

@pytest.fixture(scope="module")
def scaled_fp8_file(tmp_path_factory):
    from comfyui_krea.model_loader.flux import write_random_flux_checkpoint

    return write_random_flux_checkpoint(tmp_path_factory.mktemp("fp8") / "f.safetensors", TINY_FLUX, seed=4,
                                        layout="comfy_fp8_scaled")


@pytest.mark.parametrize("weight_dtype,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_scaled_fp8_file_loaded_as_16_bit_holds_weight_times_scale(scaled_fp8_file, weight_dtype, dtype):
    from safetensors.torch import load_file

    from comfyui_krea.model_loader.flux import load_flux
    from comfyui_krea.model_loader.flux.layouts import COMFY_PREFIX

    raw = load_file(str(scaled_fp8_file))
    key = "double_blocks.1.img_mlp.0.weight"
    weight, scale = raw[COMFY_PREFIX + key], raw[COMFY_PREFIX + key.replace(".weight", ".scale_weight")]
    assert weight.dtype == torch.float8_e4m3fn and scale.float().item() not in (0.0, 1.0)
    model = load_flux(scaled_fp8_file, weight_dtype)
    got = model.state_dict()[key]
    assert got.dtype == dtype
    assert torch.equal(got, (weight.double() * scale.double()).to(dtype))


def test_dequantize_takes_a_scale_from_another_device():
    from comfyui_krea.model_loader.flux.loading import _dequantize

    weight = torch.empty(4, 4, dtype=torch.float8_e4m3fn, device="meta")
    out = _dequantize(weight, torch.tensor([0.5]), torch.bfloat16)  # a (1,)-shaped scale left on the CPU
    assert out.device.type == "meta" and out.dtype == torch.bfloat16


# ------------------------------------------------------------------ one tensor as each weight_dtype stores it

def _convert(*args, **kwargs):
    from comfyui_krea.model_loader.flux.loading import _convert as convert

    return convert(*args, **kwargs)


LINEAR = "double_blocks.0.img_mlp.0.weight"


def test_convert_default_keeps_scaled_fp8_linears_and_dequantizes_other_fp8_tensors():
    t8, scale = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(torch.float8_e4m3fn), torch.tensor(0.25)
    kept, kept_scale = _convert(LINEAR, t8, scale, "default", {LINEAR})
    assert kept is t8 and kept_scale is scale
    other, other_scale = _convert("img_in.bias", t8, scale, "default", {LINEAR})  # not a Linear weight
    assert other_scale is None and other.dtype == torch.bfloat16
    assert other.tolist() == [[0.25, -0.5], [0.125, 1.0]]


@pytest.mark.parametrize("key", [LINEAR, "final_layer.linear.bias"])
def test_convert_default_applies_the_scale_and_the_default_dtype(key):
    t, scale = torch.tensor([1.0, -3.0]), torch.tensor(0.5)
    out, s = _convert(key, t, scale, "default", {LINEAR}, torch.float16)  # the file's float32 -> fp16
    assert s is None and out.dtype == torch.float16 and out.tolist() == [0.5, -1.5]
    out, s = _convert(key, t, None, "default", {LINEAR}, torch.float16)
    assert s is None and out.dtype == torch.float16 and out.tolist() == [1.0, -3.0]
    same = t.half()
    out, s = _convert(key, same, None, "default", {LINEAR}, torch.float16)
    assert out is same and s is None  # already the default dtype: untouched
    out, s = _convert(key, t.bfloat16(), scale, "default", {LINEAR})  # no default dtype: the file's dtype
    assert s is None and out.dtype == torch.bfloat16 and out.tolist() == [0.5, -1.5]
    plain = t.bfloat16()
    out, s = _convert(key, plain, None, "default", {LINEAR})
    assert out is plain and s is None


def test_convert_to_fp8_storage_quantizes_block_linears_after_applying_the_scale():
    t, scale = torch.tensor([[2.0, -8.0], [1.0, 4.0]]), torch.tensor(0.5)
    q, q_scale = _convert(LINEAR, t, scale, "fp8_e4m3fn", {LINEAR})
    assert q.dtype == torch.float8_e4m3fn and q_scale.item() == pytest.approx(4.0 / 448.0)
    assert torch.allclose(q.float() * q_scale, t * 0.5, rtol=0.07)
    q, q_scale = _convert(LINEAR, t, None, "fp8_e4m3fn", {LINEAR})
    assert q_scale.item() == pytest.approx(8.0 / 448.0)
    small, s = _convert("img_in.weight", t, scale, "fp8_e4m3fn", {LINEAR, "img_in.weight"})  # outside blocks
    assert s is None and small.dtype == torch.bfloat16 and small.tolist() == [[1.0, -4.0], [0.5, 2.0]]
