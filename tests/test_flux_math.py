"""FLUX's arithmetic against its formulas, each written out independently here: the rotary embedding, the timestep
embedding (as diffusers computes it), the RMS and query/key norms with their epsilon and dtypes, the fp16 clamp,
and the token layout (2x2 patches packed row-major, image ids (0, row, column), diffusers' halves swapped)."""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_krea.model_loader.flux import layers as flux_layers
from comfyui_krea.model_loader.flux import layouts
from comfyui_krea.model_loader.flux import math as flux_math

# ----------------------------------------------------------------------------- rotary and timestep embeddings

def test_rope_rotation_matrices_match_the_formula_in_float64():
    # FLUX's rotary embedding: angle = pos / theta ** (2i / dim), matrix [[cos, -sin], [sin, cos]].
    # Positions up to 1e5 make float32 arithmetic visibly worse than the float64 of the reference.
    pos = torch.tensor([[0.0, 1.0, 7.0, 4097.0, 99_991.0]])
    dim, theta = 6, 10_000
    got = flux_math.rope(pos, dim, theta)
    assert got.shape == (1, 5, 3, 2, 2) and got.dtype == torch.float32
    for i in range(dim // 2):
        omega = 1.0 / theta ** (2 * i / dim)
        for j, p in enumerate(pos[0].tolist()):
            c, s = math.cos(p * omega), math.sin(p * omega)
            want = torch.tensor([[c, -s], [s, c]], dtype=torch.float32)
            assert torch.allclose(got[0, j, i], want, atol=1e-6, rtol=0), (i, j, got[0, j, i], want)


def test_rope_of_other_theta_and_dim():
    pos = torch.tensor([[3.0, 11.0]])
    got = flux_math.rope(pos, 4, 7)
    for i, omega in enumerate((1.0, 1.0 / 7 ** 0.5)):
        for j, p in enumerate((3.0, 11.0)):
            assert math.isclose(got[0, j, i, 1, 0].item(), math.sin(p * omega), abs_tol=1e-6)
            assert math.isclose(got[0, j, i, 0, 0].item(), math.cos(p * omega), abs_tol=1e-6)


@pytest.mark.parametrize("dim", [8, 7, 256])
def test_timestep_embedding_matches_diffusers(dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 0.013, 0.5, 1.0])
    want = get_timestep_embedding(1000.0 * t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    got = flux_math.timestep_embedding(t, dim)
    assert got.shape == (4, dim) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    if dim % 2:
        assert torch.equal(got[:, -1], torch.zeros(4))


def test_timestep_embedding_max_period_and_time_factor():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    want = get_timestep_embedding(10.0 * t.float(), 6, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=50)
    got = flux_math.timestep_embedding(t, 6, max_period=50, time_factor=10.0)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------ norms

def rms_norm_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return (x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * scale.double())


def test_rms_norm_matches_the_formula_including_its_epsilon():
    gen = torch.Generator().manual_seed(0)
    norm = flux_layers.RMSNorm(8)
    with torch.no_grad():
        norm.scale.copy_(torch.randn(8, generator=gen))
    # mean(x^2) of 1e-6 makes the 1e-6 epsilon count by half; a unit-size row checks the plain formula.
    x = torch.cat([torch.randn(1, 3, 8, generator=gen), 1e-3 * torch.randn(1, 3, 8, generator=gen)], dim=1)
    got = norm(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), rms_norm_reference(x, norm.scale.detach()), rtol=1e-5, atol=1e-7)


def test_rms_norm_of_bf16_input_computes_in_float32_and_returns_bf16():
    gen = torch.Generator().manual_seed(1)
    norm = flux_layers.RMSNorm(16)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(16, generator=gen) + 0.5)
    x = (300.0 * torch.randn(2, 16, generator=gen)).to(torch.bfloat16)  # x*x overflows no float, bf16 rounds
    got = norm(x)
    assert got.dtype == torch.bfloat16
    normalized = (x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    want = normalized * norm.scale.detach().to(torch.bfloat16)
    assert torch.equal(got, want)


def test_rms_norm_scale_follows_the_input_device():
    # Under ComfyUI's partial loading the scale may stay on another device than the activations.
    norm = flux_layers.RMSNorm(4)
    out = norm(torch.empty(2, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4)


def test_qk_norm_normalizes_query_and_key_with_their_own_scales_in_v_dtype():
    gen = torch.Generator().manual_seed(2)
    qk = flux_layers.QKNorm(4)
    with torch.no_grad():
        qk.query_norm.scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        qk.key_norm.scale.copy_(torch.tensor([-1.0, 0.5, 0.25, 2.0]))
    q, k = torch.randn(1, 2, 3, 4, generator=gen), torch.randn(1, 2, 3, 4, generator=gen)
    v = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    q_out, k_out = qk(q, k, v)
    assert q_out.dtype == k_out.dtype == torch.bfloat16
    assert torch.allclose(q_out.float(), rms_norm_reference(q, qk.query_norm.scale.detach()).float(), rtol=1e-2)
    assert torch.allclose(k_out.float(), rms_norm_reference(k, qk.key_norm.scale.detach()).float(), rtol=1e-2)


# ------------------------------------------------------------------------------------------- fp16 activations

def test_fp16_activations_are_kept_finite_and_other_dtypes_untouched():
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5, -70000.0])
    half = flux_math.clamp_fp16(special.half())  # -70000 overflows fp16 to -inf on the cast
    assert half.dtype == torch.float16
    assert half.tolist() == [0.0, 65504.0, -65504.0, 1.5, -65504.0]  # 65504: float16's largest finite value
    for dtype in (torch.float32, torch.bfloat16):
        out = flux_math.clamp_fp16(special.to(dtype))
        assert out.dtype == dtype and torch.equal(out.isnan(), special.isnan())
        assert out[1:].tolist() == special[1:].to(dtype).tolist()


# ----------------------------------------------------------------------- token layout (pack, ids) written out

def test_image_ids_are_zero_row_column_in_row_major_order():
    ids = flux_math.image_ids(2, 4, 6)  # a 2 x 3 grid of 2x2 patches
    want = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]], dtype=torch.float32)
    assert ids.shape == (2, 6, 3) and ids.dtype == torch.float32 and ids.is_contiguous()
    assert torch.equal(ids[0], want) and torch.equal(ids[1], want)
    assert torch.equal(flux_math.text_ids(3, 5), torch.zeros(3, 5, 3))


def test_pack_takes_2x2_patches_row_major_channel_major_inside():
    latent = torch.arange(2 * 2 * 4 * 6, dtype=torch.float32).reshape(2, 2, 4, 6)
    tokens = flux_math.pack(latent)
    assert tokens.shape == (2, 6, 8)
    for b in range(2):
        for row in range(2):
            for col in range(3):
                patch = latent[b, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2]  # (C, 2, 2): channel, then y, x
                assert torch.equal(tokens[b, row * 3 + col], patch.reshape(-1))
    assert torch.equal(flux_math.unpack(tokens, 4, 6), latent)


def test_swap_halves_exchanges_the_two_halves_of_dim_0():
    t = torch.arange(12).reshape(6, 2)
    assert torch.equal(layouts.swap_halves(t), torch.tensor([[6, 7], [8, 9], [10, 11], [0, 1], [2, 3], [4, 5]]))
    assert torch.equal(layouts.swap_halves(torch.tensor([1, 2])), torch.tensor([2, 1]))
