"""Gaps in the model_loader tests that mutation testing (bench/mutation.py) found, checked against the
documented contract rather than the implementation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_krea.model_loader import ModelFileError, operations
from comfyui_krea.model_loader.autoencoder import AutoEncoder, AutoEncoderConfig, tiling
from comfyui_krea.model_loader.checkpoints import FileKind, StateDictSource
from comfyui_krea.model_loader.flux import FluxConfig, FluxTransformer, layouts, load_flux_from_source
from comfyui_krea.model_loader.flux import math as flux_math
from comfyui_krea.model_loader.flux import model as flux_model
from conftest import TINY_AUTOENCODER, TINY_FLUX, rel_err


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA runtime that answers like a GPU of the given compute capability, on this CPU-only machine."""
    asked = []

    def install(capability=(8, 9), available=True, scaled_mm=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

        def get_device_capability(device=None):
            asked.append(device)
            return capability

        monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
        if not scaled_mm:
            monkeypatch.delattr(torch, "_scaled_mm", raising=False)
        return asked

    return install


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


# ------------------------------------------------------------------------------ FLUX math against formulas


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


def rms_norm_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return (x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * scale.double())


def test_rms_norm_matches_the_formula_including_its_epsilon():
    gen = torch.Generator().manual_seed(0)
    norm = flux_model.RMSNorm(8)
    with torch.no_grad():
        norm.scale.copy_(torch.randn(8, generator=gen))
    # mean(x^2) of 1e-6 makes the 1e-6 epsilon count by half; a unit-size row checks the plain formula.
    x = torch.cat([torch.randn(1, 3, 8, generator=gen), 1e-3 * torch.randn(1, 3, 8, generator=gen)], dim=1)
    got = norm(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), rms_norm_reference(x, norm.scale.detach()), rtol=1e-5, atol=1e-7)


def test_rms_norm_of_bf16_input_computes_in_float32_and_returns_bf16():
    gen = torch.Generator().manual_seed(1)
    norm = flux_model.RMSNorm(16)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(16, generator=gen) + 0.5)
    x = (300.0 * torch.randn(2, 16, generator=gen)).to(torch.bfloat16)  # x*x overflows no float, bf16 rounds
    got = norm(x)
    assert got.dtype == torch.bfloat16
    normalized = (x.double() / torch.sqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    want = normalized * norm.scale.detach().to(torch.bfloat16)
    assert torch.equal(got, want)


def test_qk_norm_normalizes_query_and_key_with_their_own_scales_in_v_dtype():
    gen = torch.Generator().manual_seed(2)
    qk = flux_model.QKNorm(4)
    with torch.no_grad():
        qk.query_norm.scale.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        qk.key_norm.scale.copy_(torch.tensor([-1.0, 0.5, 0.25, 2.0]))
    q, k = torch.randn(1, 2, 3, 4, generator=gen), torch.randn(1, 2, 3, 4, generator=gen)
    v = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    q_out, k_out = qk(q, k, v)
    assert q_out.dtype == k_out.dtype == torch.bfloat16
    assert torch.allclose(q_out.float(), rms_norm_reference(q, qk.query_norm.scale.detach()).float(), rtol=1e-2)
    assert torch.allclose(k_out.float(), rms_norm_reference(k, qk.key_norm.scale.detach()).float(), rtol=1e-2)


def test_swap_halves_exchanges_the_two_halves_of_dim_0():
    t = torch.arange(12).reshape(6, 2)
    assert torch.equal(layouts.swap_halves(t), torch.tensor([[6, 7], [8, 9], [10, 11], [0, 1], [2, 3], [4, 5]]))
    assert torch.equal(layouts.swap_halves(torch.tensor([1, 2])), torch.tensor([2, 1]))


# -------------------------------------------------------------------- the diffusers layout, from diffusers


def diffusers_flux(config, seed: int):
    """diffusers' own FluxTransformer2DModel of `config`, every parameter drawn at random (seeded)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
        num_single_layers=config.depth_single_blocks, attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads, joint_attention_dim=config.context_in_dim,
        pooled_projection_dim=config.vec_in_dim, guidance_embeds=config.guidance_embed,
        axes_dims_rope=config.axes_dim).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def flux_inputs(config, batch: int = 1, h: int = 3, w: int = 2, txt_len: int = 4):
    gen = torch.Generator().manual_seed(5)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(img=torch.randn(batch, h * w, config.in_channels, generator=gen),
                img_ids=ids.reshape(1, h * w, 3).expand(batch, -1, -1),
                txt=torch.randn(batch, txt_len, config.context_in_dim, generator=gen),
                txt_ids=torch.zeros(batch, txt_len, 3),
                timesteps=torch.full((batch,), 0.6), y=torch.randn(batch, config.vec_in_dim, generator=gen),
                guidance=torch.full((batch,), 3.5))


def diffusers_output(model, x):
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                     guidance=x["guidance"] if model.config.guidance_embeds else None, return_dict=False)[0]


def ours_from_state(state):
    model = load_flux_from_source(StateDictSource(state))
    with torch.no_grad():
        return model, model.forward_orig(**flux_inputs(model.config))


@pytest.fixture(scope="module")
def diffusers_tiny():
    model = diffusers_flux(TINY_FLUX, seed=9)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_diffusers_weights_drawn_by_diffusers_load_to_the_same_function(diffusers_tiny):
    reference, state = diffusers_tiny
    assert layouts.plan_flux_layout(StateDictSource(state), "f").kind == "diffusers"
    model, out = ours_from_state(state)
    assert model.config == TINY_FLUX
    assert rel_err(out, diffusers_output(reference, flux_inputs(TINY_FLUX))) < 1e-5
    # the final layer's (shift, scale) are diffusers' norm_out (scale, shift) with the halves exchanged
    w = state["norm_out.linear.weight"]
    assert torch.equal(model.final_layer.adaLN_modulation[1].weight, torch.cat([w[32:], w[:32]]))


def test_diffusers_file_without_attention_bias(diffusers_tiny):
    """Some exports drop the q/k/v biases of the double blocks (qkv_bias=False); zero biases are the same model."""
    _, state = diffusers_tiny
    reference = diffusers_flux(TINY_FLUX, seed=9)  # the same weights; the fixture's model stays untouched
    names = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
    dropped = {k for k in state if k.startswith("transformer_blocks.") and k.split(".")[-2] in names
               and k.endswith(".bias")}
    assert len(dropped) == 2 * 6
    with torch.no_grad():
        for k in dropped:
            reference.get_parameter(k).zero_()
    model, out = ours_from_state({k: v for k, v in state.items() if k not in dropped})
    assert model.config.qkv_bias is False and model.double_blocks[0].img_attn.qkv.bias is None
    assert model.single_blocks[0].linear1.bias is not None  # the single blocks keep theirs
    assert rel_err(out, diffusers_output(reference, flux_inputs(TINY_FLUX))) < 1e-5


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_diffusers_file_with_missing_or_extra_tensors(diffusers_tiny, change):
    _, state = diffusers_tiny
    state = dict(state)
    if change == "missing":
        del state["single_transformer_blocks.1.proj_mlp.bias"]
    else:
        state["transformer_blocks.1.attn.to_q.lora.weight"] = torch.zeros(2, 2)
    with pytest.raises(ModelFileError, match={"missing": "missing 1 tensors", "extra": "holds 1 tensors"}[change]):
        layouts.plan_flux_layout(StateDictSource(state), "my.safetensors")


def test_diffusers_tensors_that_do_not_fit_together(diffusers_tiny):
    _, state = diffusers_tiny
    state = dict(state, **{"transformer_blocks.0.attn.to_k.weight": torch.zeros(32, 31)})
    with pytest.raises(ModelFileError, match="do not fit together"):
        layouts.plan_flux_layout(StateDictSource(state), "my.safetensors")


# ------------------------------------------------------------------ token layout (pack, ids) written out


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


def test_comfy_forward_takes_inputs_comfyui_passes_as_none():
    # ComfyUI's FLUX callers pass extra keyword inputs set to None (ref_latents, attention_mask): no refusal.
    model = FluxTransformer(TINY_FLUX).eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        x, context = torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 3, 32, generator=gen)
        y, t, g = torch.randn(1, 16, generator=gen), torch.tensor([0.5]), torch.tensor([3.0])
        plain = model(x, t, context, y=y, guidance=g)
        assert torch.equal(model(x, t, context, y=y, guidance=g, ref_latents=None, attention_mask=None), plain)


# ------------------------------------------------------------------------- files that are not FLUX's


@pytest.mark.parametrize("keys,found", [
    (["text_model.encoder.layers.0.mlp.fc1.weight", "text_model.final_layer_norm.weight"], FileKind.CLIP_TEXT),
    ([f"unknown_{i}.weight" for i in range(7)], FileKind.UNKNOWN),
])
def test_other_files_say_what_they_are_and_what_was_expected(keys, found):
    with pytest.raises(ModelFileError) as err:
        layouts.plan_flux_layout(StateDictSource({k: torch.zeros(1) for k in keys}), "x.safetensors")
    assert err.value.found is found and err.value.expected is FileKind.FLUX_TRANSFORMER
    assert str(err.value).endswith("Use a FLUX.1 transformer file (e.g. flux1-krea-dev.safetensors).")
    if found is FileKind.UNKNOWN:  # a file of no known kind is described by its first five key names
        assert "first keys: " + ", ".join(f"unknown_{i}.weight" for i in range(5)) + ")" in str(err.value)


def random_flux(seed: int = 8) -> FluxTransformer:
    model = FluxTransformer(TINY_FLUX).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def comfy_inputs(h: int, w: int):
    gen = torch.Generator().manual_seed(12)
    return (torch.randn(1, 16, h, w, generator=gen), torch.tensor([0.5]), torch.randn(1, 3, 32, generator=gen),
            torch.randn(1, 16, generator=gen), torch.tensor([3.0]))


@pytest.mark.parametrize("h,w", [(5, 4), (4, 3), (5, 3)])
def test_comfy_forward_wraps_odd_sides_around_like_comfyui(h, w):
    # ComfyUI's FLUX pads an odd latent side by wrapping (circular): the first row / column repeated after the
    # last; the output is cropped back. Written out here with cat, then run through the reference call.
    model = random_flux()
    x, t, context, y, g = comfy_inputs(h, w)
    padded = torch.cat([x, x[:, :, :1]], dim=2) if h % 2 else x
    padded = torch.cat([padded, padded[:, :, :, :1]], dim=3) if w % 2 else padded
    lh, lw = padded.shape[-2:]
    with torch.no_grad():
        out = model(x, t, context, y=y, guidance=g)
        tokens = model.forward_orig(flux_math.pack(padded), flux_math.image_ids(1, lh, lw), context,
                                    flux_math.text_ids(1, 3), t, y, g)
    assert out.shape == x.shape
    assert torch.equal(out, flux_math.unpack(tokens, lh, lw)[:, :, :h, :w])


def test_comfy_forward_refuses_an_attention_mask_as_a_mask():
    model = random_flux()
    x, t, context, y, g = comfy_inputs(4, 4)
    with pytest.raises(NotImplementedError, match="takes no attention mask"):
        model(x, t, context, y=y, guidance=g, attention_mask=torch.ones(1, 7, 7, dtype=torch.bool))


def test_comfy_forward_builds_position_ids_on_the_latents_device():
    # On the meta device nothing is computed; ids left on the CPU would fail next to meta tensors.
    model = FluxTransformer(TINY_FLUX, device="meta")
    meta = dict(device="meta")
    out = model(torch.empty(1, 16, 4, 6, **meta), torch.empty(1, **meta), torch.empty(1, 3, 32, **meta),
                y=torch.empty(1, 16, **meta), guidance=torch.empty(1, **meta))
    assert out.shape == (1, 16, 4, 6) and out.device.type == "meta"


def test_autoencoder_pass_bytes_grows_with_batch_size_and_precision():
    from comfyui_krea.model_loader.autoencoder import AutoEncoder

    with torch.device("meta"):
        vae = AutoEncoder(TINY_AUTOENCODER)
    cpu = torch.device("cpu")
    one = vae.pass_bytes("decode", 1, 16, 16, cpu)
    assert isinstance(one, int) and one > 16 * 16 * 64 * 4  # at least one float32 feature map of the top level
    assert vae.pass_bytes("decode", 3, 16, 16, cpu) == 3 * one
    assert vae.pass_bytes("decode", 1, 16, 32, cpu) > one and vae.pass_bytes("decode", 1, 32, 16, cpu) > one
    assert vae.pass_bytes("encode", 1, 16, 16, cpu) != one
    assert vae.to(torch.bfloat16).pass_bytes("decode", 1, 16, 16, cpu) < one
    assert vae.pass_bytes("decode", 1, 16, 16, torch.device("cuda")) > 0  # asks no CUDA runtime


def test_diffusers_file_with_double_blocks_only():
    config = FluxConfig(**{**TINY_FLUX.__dict__, "depth_single_blocks": 0, "guidance_embed": False})
    reference = diffusers_flux(config, seed=6)
    model, out = ours_from_state({k: v.detach().clone() for k, v in reference.state_dict().items()})
    assert model.config == config and len(model.single_blocks) == 0
    assert rel_err(out, diffusers_output(reference, flux_inputs(config))) < 1e-5


def test_diffusers_plan_reports_the_files_dtype_and_fused_shapes(diffusers_tiny):
    _, state = diffusers_tiny
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    plan = layouts.plan_flux_layout(StateDictSource(state), "f").tensors
    assert {t.dtype for t in plan.values()} == {torch.bfloat16}
    qkv = plan["double_blocks.1.txt_attn.qkv.weight"]
    assert qkv.shape == (96, 32)
    parts = [state[f"transformer_blocks.1.attn.add_{x}_proj.weight"] for x in "qkv"]
    assert torch.equal(qkv.read(), torch.cat(parts))
    linear1 = plan["single_blocks.0.linear1.bias"]
    assert linear1.shape == (3 * 32 + 128,)
    assert torch.equal(linear1.read(), torch.cat([state[f"single_transformer_blocks.0.{p}.bias"]
                                                  for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]))


def test_fp16_activations_are_kept_finite_and_other_dtypes_untouched():
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5, -70000.0])
    half = flux_math.clamp_fp16(special.half())  # -70000 overflows fp16 to -inf on the cast
    assert half.dtype == torch.float16
    assert half.tolist() == [0.0, 65504.0, -65504.0, 1.5, -65504.0]  # 65504: float16's largest finite value
    for dtype in (torch.float32, torch.bfloat16):
        out = flux_math.clamp_fp16(special.to(dtype))
        assert out.dtype == dtype and torch.equal(out.isnan(), special.isnan())
        assert out[1:].tolist() == special[1:].to(dtype).tolist()


def test_rms_norm_scale_follows_the_input_device():
    # Under ComfyUI's partial loading the scale may stay on another device than the activations.
    norm = flux_model.RMSNorm(4)
    out = norm(torch.empty(2, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 4)


def test_reference_call_computes_in_the_image_tokens_dtype():
    # The image tokens set the compute dtype: float32 text and pooled vectors are cast to it first.
    model = load_flux_from_source(StateDictSource(random_flux().state_dict()))
    x = flux_inputs(TINY_FLUX, batch=1)
    with torch.no_grad():
        cast = model.forward_orig(**{**x, "img": x["img"].bfloat16(), "txt": x["txt"].bfloat16(),
                                     "y": x["y"].bfloat16()})
        mixed = model.forward_orig(**{**x, "img": x["img"].bfloat16()})
    assert cast.dtype == mixed.dtype == torch.bfloat16
    assert torch.equal(mixed, cast)


@pytest.mark.parametrize("img_shape,txt_shape", [((1, 6, 64), (4, 32)), ((6, 64), (1, 4, 32))])
def test_reference_call_refuses_unbatched_tokens(img_shape, txt_shape):
    model = random_flux()
    x = flux_inputs(TINY_FLUX, batch=1)
    with pytest.raises(ValueError, match=r"must be \(B, L, C\)"):
        model.forward_orig(**{**x, "img": torch.zeros(img_shape), "txt": torch.zeros(txt_shape)})


# ---------------------------------------------------------------------- scaled fp8 files, converted on load


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


# -------------------------------------------------------------- compute dtypes, fp8 quantization, patches


@pytest.mark.parametrize("available,bf16,device,expected", [
    (True, True, "cuda", torch.bfloat16), (True, False, "cuda", torch.float32), (False, True, "cuda", torch.float32),
    (True, True, "cpu", torch.float32), (True, True, "mps", torch.float32)])
def test_autoencoder_computes_in_bf16_only_on_gpus_that_have_it(monkeypatch, available, bf16, device, expected):
    from comfyui_krea.model_loader.compute_dtypes import autoencoder_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert autoencoder_compute_dtype(torch.device(device)) is expected


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


def test_block_patches_of_comfyuis_flux_are_refused():
    model = random_flux()
    x, t, context, y, g = comfy_inputs(4, 4)
    with pytest.raises(NotImplementedError, match="block patches"):
        model(x, t, context, y=y, guidance=g, transformer_options={"patches": {"double_block": [print]}})


@pytest.mark.parametrize("layer", ["norm", "q", "proj_out"])
def test_vae_attention_key_names_new_then_old(layer):
    from comfyui_krea.model_loader.autoencoder.layouts import diffusers_key_names

    new = {"norm": "group_norm", "q": "to_q", "proj_out": "to_out.0"}[layer]
    old = {"norm": None, "q": "query", "proj_out": "proj_attn"}[layer]
    want = [f"decoder.mid_block.attentions.0.{new}.bias"] + ([f"decoder.mid_block.attentions.0.{old}.bias"]
                                                             if old else [])
    assert diffusers_key_names(f"decoder.mid.attn_1.{layer}.bias", 4) == want


# ------------------------------------------------------------------------------------ autoencoder entry


@pytest.fixture(scope="module")
def tiny_vae():
    from comfyui_krea.model_loader.autoencoder import AutoEncoder

    vae = AutoEncoder(TINY_AUTOENCODER).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return vae


@pytest.mark.parametrize("shape", [(1, 3, 0, 16), (1, 3, 16, 0), (1, 4, 16, 16), (3, 16, 16)])
def test_encode_refuses_empty_or_misshaped_images(tiny_vae, shape):
    with pytest.raises(ValueError, match="encode expects images|multiples of 8"):
        tiny_vae.encode(torch.zeros(shape))


def test_encode_of_a_bf16_vae_takes_float32_images_and_returns_float32(tiny_vae):
    import copy

    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    half = copy.deepcopy(tiny_vae).to(torch.bfloat16)
    out = half.encode(images)
    assert out.dtype == torch.float32 and out.shape == (1, 16, 2, 2)
    assert rel_err(out, tiny_vae.encode(images)) < 0.05


def test_forced_encode_tiles_report_progress(tiny_vae):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    calls = []
    tiled = tiny_vae.encode(images, tile_size=32, tile_overlap=16, callback=lambda *a: calls.append(a))
    assert len(calls) >= 4  # at least a 2 x 2 grid of tiles
    assert not torch.equal(tiled, tiny_vae.encode(images))  # tiles see only part of the image


# ------------------------------------------------------------------------- VAE config read off the shapes


def vae_state(config, seed: int = 1):
    from comfyui_krea.model_loader.autoencoder import AutoEncoder

    with torch.device("meta"):
        return dict(AutoEncoder(config).state_dict())


@pytest.mark.parametrize("layout,ch_mult", [("bfl", (1, 2, 4)), ("diffusers", (1, 2, 4)), ("bfl", (2,))])
def test_vae_config_other_than_the_defaults_is_read_off_the_shapes(layout, ch_mult, tmp_path):
    from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig, load_autoencoder
    from comfyui_krea.model_loader.autoencoder import write_random_autoencoder_checkpoint as write

    config = AutoEncoderConfig(in_channels=4, out_channels=1, ch=32, ch_mult=ch_mult, num_res_blocks=1,
                               z_channels=16, mid_attention=False)
    path = write(tmp_path / ("ae.safetensors" if layout == "bfl" else "vae"), config, seed=2, layout=layout)
    assert load_autoencoder(path, "cpu").config == config


def _vae_error(tmp_path, state):
    from safetensors.torch import save_file

    from comfyui_krea.model_loader.autoencoder import load_autoencoder

    path = tmp_path / "v.safetensors"
    save_file({k: torch.zeros(v.shape) for k, v in state.items()}, str(path))
    with pytest.raises(ModelFileError) as err:
        load_autoencoder(path, "cpu")
    return str(err.value)


@pytest.mark.parametrize("extra", ["quant_conv.weight", "post_quant_conv.weight"])
def test_vae_with_quant_conv_layers_is_another_models(tmp_path, extra):
    from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig

    state = vae_state(AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))  # 16 latent channels
    state[extra] = torch.empty(32, 32, 1, 1, device="meta")
    assert "(it has quant_conv layers, which FLUX's autoencoder does not)" in _vae_error(tmp_path, state)


def test_sd_vae_error_names_stable_diffusion(tmp_path):
    from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig

    message = _vae_error(tmp_path, vae_state(AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                                z_channels=4)))
    assert "4 latent channels, not 16 (a Stable Diffusion 1.x/2.x/SDXL VAE)" in message
    message = _vae_error(tmp_path, vae_state(AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                                                z_channels=8)))
    assert "8 latent channels, not 16." in message  # no hint for a VAE of no known model


@pytest.mark.parametrize("available,bf16,device,stored,expected", [
    (True, True, "cuda", torch.bfloat16, torch.bfloat16), (True, False, "cuda", torch.bfloat16, torch.float16),
    (True, True, "cuda", torch.float16, torch.float16), (True, True, "cuda", torch.float8_e4m3fn, torch.float16),
    (True, True, "cpu", torch.bfloat16, torch.float32), (True, True, "mps", torch.float16, torch.float32)])
def test_text_encoder_compute_dtype(monkeypatch, available, bf16, device, stored, expected):
    from comfyui_krea.model_loader.compute_dtypes import text_encoder_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert text_encoder_compute_dtype(torch.device(device), stored) is expected


def test_vae_group_norms_use_diffusers_epsilon():
    from diffusers import AutoencoderKL

    reference = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                              layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                              use_post_quant_conv=False)
    theirs = [(m.num_groups, m.eps, m.affine) for m in reference.modules() if isinstance(m, torch.nn.GroupNorm)]
    with torch.device("meta"):  # built here, not taken from a shared fixture: mutmut maps tests by what they call
        ours = [(m.num_groups, m.eps, m.affine) for m in AutoEncoder(TINY_AUTOENCODER).modules()
                if isinstance(m, torch.nn.GroupNorm)]
    assert sorted(ours) == sorted(theirs) and {eps for _, eps, _ in ours} == {1e-6}


# ------------------------------------------------------------------ the fp8 matmul path, against the formula


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


def test_every_vae_layer_comes_from_the_operations_given():
    # ComfyUI builds models with its own layer classes (comfy.ops: weight casting, offloading).
    import types

    from comfyui_krea.model_loader.autoencoder import AutoEncoder

    class Conv(torch.nn.Conv2d):
        pass

    class Norm(torch.nn.GroupNorm):
        pass

    ops = types.SimpleNamespace(Conv2d=Conv, GroupNorm=Norm, Linear=torch.nn.Linear)
    with torch.device("meta"):
        vae = AutoEncoder(TINY_AUTOENCODER, ops)
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert convs and norms
    assert all(type(m) is Conv for m in convs) and all(type(m) is Norm for m in norms)


# --------------------------------------------------------------------------- BFL / ComfyUI layouts


@pytest.fixture(scope="module")
def bfl_state():
    return {k: v.detach().clone() for k, v in random_flux(seed=21).state_dict().items()}


def test_layout_names_of_bfl_comfy_and_scaled_fp8_files(bfl_state):
    from comfyui_krea.model_loader.flux.layouts import COMFY_PREFIX

    assert layouts.plan_flux_layout(StateDictSource(bfl_state), "f").kind == "bfl"
    comfy = {COMFY_PREFIX + k: v for k, v in bfl_state.items()}
    assert layouts.plan_flux_layout(StateDictSource(comfy), "f").kind == "comfy"
    key = COMFY_PREFIX + "single_blocks.0.linear2.weight"
    q, scale = operations.quantize_fp8(comfy[key])
    scaled = {**comfy, key: q, key.replace(".weight", ".scale_weight"): scale}
    assert layouts.plan_flux_layout(StateDictSource(scaled), "f").kind == "comfy_fp8_scaled"


def test_scaled_fp8_markers_and_activation_scales_are_skipped_wherever_they_are(bfl_state):
    from comfyui_krea.model_loader.flux.layouts import COMFY_PREFIX

    key = "double_blocks.0.img_mlp.2.weight"
    q, scale = operations.quantize_fp8(bfl_state[key])
    # ComfyUI's scaled files: a `scaled_fp8` marker and `.scale_input` activation scales, here written first.
    state = {COMFY_PREFIX + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
             COMFY_PREFIX + key.replace(".weight", ".scale_input"): torch.tensor(1.0)}
    state.update({COMFY_PREFIX + k: v for k, v in bfl_state.items()})
    state[COMFY_PREFIX + key] = q
    state[COMFY_PREFIX + key.replace(".weight", ".scale_weight")] = scale
    layout = layouts.plan_flux_layout(StateDictSource(state), "f")
    assert set(layout.tensors) == set(bfl_state)
    assert layout.tensors[key].scale is not None and layout.tensors[key.replace(".weight", ".bias")].scale is None
    model = load_flux_from_source(StateDictSource(state))
    assert torch.equal(model.double_blocks[0].img_mlp[2].weight.float(), q.float())


def test_comfy_file_with_unknown_tensors_outside_the_transformer_is_refused(bfl_state):
    from comfyui_krea.model_loader.flux.layouts import COMFY_PREFIX

    state = {COMFY_PREFIX + k: v for k, v in bfl_state.items()}
    state["model.some_adapter.weight"] = torch.zeros(2)
    with pytest.raises(ModelFileError, match=r"^my_flux\.safetensors holds tensors outside the FLUX transformer"):
        layouts.plan_flux_layout(StateDictSource(state), "my_flux.safetensors")  # the message names the file


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


def test_t5_config_with_an_attention_width_other_than_the_model_width(tmp_path):
    from comfyui_krea.model_loader.checkpoints import Checkpoint
    from comfyui_krea.model_loader.text_encoders import T5EncoderConfig
    from comfyui_krea.model_loader.text_encoders.random_weights import write_random_t5_checkpoint
    from comfyui_krea.model_loader.text_encoders.t5 import config_from_checkpoint

    config = T5EncoderConfig(d_model=64, d_kv=8, heads=4, d_ff=96, layers=2)  # inner width 32, not 64
    path = write_random_t5_checkpoint(tmp_path / "t5.safetensors", config)
    assert config_from_checkpoint(Checkpoint(path)) == config


# ----------------------------------------------------------- one tensor as each weight_dtype stores it


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


def test_flux_config_other_than_the_defaults_is_read_off_the_shapes():
    from comfyui_krea.model_loader.flux import config_from_checkpoint

    config = FluxConfig(in_channels=16, out_channels=16, vec_in_dim=8, context_in_dim=24, hidden_size=32,
                        mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6),
                        qkv_bias=False, guidance_embed=False)
    with torch.device("meta"):
        state = FluxTransformer(config).state_dict()
    assert config_from_checkpoint(dict(state)) == config


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


def test_clip_config_other_than_the_defaults_is_read_off_the_shapes(tmp_path):
    from comfyui_krea.model_loader.checkpoints import Checkpoint
    from comfyui_krea.model_loader.text_encoders import CLIPTextConfig
    from comfyui_krea.model_loader.text_encoders.clip import config_from_checkpoint
    from comfyui_krea.model_loader.text_encoders.random_weights import write_random_clip_checkpoint

    config = CLIPTextConfig(vocab_size=1000, width=64, layers=2, intermediate=96, positions=40, eos_token_id=999)
    path = write_random_clip_checkpoint(tmp_path / "clip.safetensors", config)
    assert config_from_checkpoint(Checkpoint(path)) == config


# ------------------------------------------------- the weight storage a load decides (what picks the layer classes)

def _shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in FluxTransformer(config).state_dict().items()}


def _flux_state(dtype: torch.dtype, others: torch.dtype | None = None, block_bias: torch.dtype | None = None) -> dict:
    """A tiny FLUX state dict: blocks' weights in `dtype`; the other tensors in `others`, listed first (as a
    file may order them), and the blocks' biases in `block_bias`, ahead of the block weights."""
    shapes = _shapes(TINY_FLUX)
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


def test_a_transformer_of_single_blocks_only_is_read_off_its_shapes():
    config = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64,
                        mlp_ratio=3.0, num_heads=4, depth=0, depth_single_blocks=2, axes_dim=(4, 6, 6))
    got = layouts.config_from_shapes(_shapes(config), "single.safetensors")
    assert (got.hidden_size, got.num_heads, got.mlp_ratio, got.depth, got.depth_single_blocks) == (64, 4, 3.0, 0, 2)


@pytest.mark.parametrize("head_dim", [0, 24])  # none at all; not a divisor of the hidden size 64
def test_an_impossible_head_dim_is_a_model_file_error(head_dim):
    shapes = _shapes(TINY_FLUX)
    shapes["double_blocks.0.img_attn.norm.query_norm.scale"] = (head_dim,)
    with pytest.raises(ModelFileError, match=f"not a multiple of the head dim {head_dim}"):
        layouts.config_from_shapes(shapes, "odd.safetensors")


def test_an_fp8_scale_without_its_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from comfyui_krea.model_loader.checkpoints import open_checkpoint
    from comfyui_krea.model_loader.flux import write_random_flux_checkpoint

    path = write_random_flux_checkpoint(tmp_path / "scaled.safetensors", TINY_FLUX, layout="comfy_fp8_scaled")
    state = load_file(path)
    state["model.diffusion_model.double_blocks.0.img_mod.extra.scale_weight"] = torch.tensor(1.0)
    save_file(state, tmp_path / "orphan.safetensors")
    with pytest.raises(ModelFileError, match="fp8 scales without weights"):
        layouts.plan_flux_layout(open_checkpoint(tmp_path / "orphan.safetensors"), "orphan.safetensors")


def test_every_layer_is_built_where_and_as_asked():
    """Loading builds the model on the meta device (no memory until the weights are assigned): every parameter
    must land there, in the dtype asked for; and the norms are FLUX's (no affine, eps 1e-6, not torch's 1e-5)."""
    model = FluxTransformer(TINY_FLUX, dtype=torch.float16, device="meta")
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("meta", torch.float16)}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(n.eps == 1e-6 and n.weight is None for n in norms)
    assert all(layer.bias is not None for block in model.single_blocks for layer in (block.linear1, block.linear2))


def test_t5_clamps_fp16_activations_only():
    from comfyui_krea.model_loader.text_encoders import t5

    big = torch.finfo(torch.float16).max
    half = torch.tensor([-float("inf"), -big, 1.5, big, float("inf")], dtype=torch.float16)
    guarded = t5._fp16_guard(half)
    assert guarded.dtype == torch.float16 and torch.isfinite(guarded).all()
    assert guarded[2] == 1.5 and guarded[3] == -guarded[1] == t5._FP16_SAFE_MAX < big
    wide = torch.tensor([-1e30, 1e30], dtype=torch.float32)
    assert torch.equal(t5._fp16_guard(wide), wide)  # float32 and bf16 activations are left alone


@pytest.mark.parametrize("dtype, compute", [(None, torch.float32), (torch.float16, torch.float16),
                                            (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                            (torch.float8_e4m3fn, torch.bfloat16)])
def test_the_transformer_says_what_it_computes_in_and_its_sizes(dtype, compute):
    """compute_dtype (fp8 storage computes in bf16), and the sizes ComfyUI's FLUX exposes on its
    diffusion_model (in/out channels, hidden size, heads), which code written for ComfyUI reads."""
    model = FluxTransformer(TINY_FLUX, dtype=dtype, device="meta")
    assert model.compute_dtype == compute
    assert (model.in_channels, model.out_channels, model.hidden_size, model.num_heads) == \
        (TINY_FLUX.in_channels, TINY_FLUX.out_channels, TINY_FLUX.hidden_size, TINY_FLUX.num_heads)


# ---------------------------------------------------------------- text encoder and VAE configs read off the files

def _rewritten(path, tmp_path, drop: str | None = None, name: str = "edited.safetensors"):
    """The file again, without the tensors whose key contains `drop`."""
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(path).items() if drop is None or drop not in k}
    save_file(state, tmp_path / name)
    return tmp_path / name


def test_t5_sizes_come_from_the_file_not_from_t5_xxl(tmp_path):
    from comfyui_krea.model_loader.text_encoders import T5EncoderConfig, load_t5_model, write_random_t5_checkpoint

    config = T5EncoderConfig(vocab_size=300, d_model=32, d_kv=8, heads=2, d_ff=48, layers=2, relative_buckets=16)
    model = load_t5_model(write_random_t5_checkpoint(tmp_path / "t5.safetensors", config))
    assert (model.config.vocab_size, model.config.relative_buckets, model.config.layers) == (300, 16, 2)
    assert not any(p.requires_grad for p in model.parameters())  # frozen, as every loaded model


def test_a_gap_in_the_layers_is_a_model_file_error(tmp_path):
    from comfyui_krea.model_loader.text_encoders import (
        CLIPTextConfig,
        T5EncoderConfig,
        load_clip_model,
        load_t5_model,
        write_random_clip_checkpoint,
        write_random_t5_checkpoint,
    )

    t5 = write_random_t5_checkpoint(tmp_path / "t5.safetensors", T5EncoderConfig(
        vocab_size=300, d_model=32, d_kv=8, heads=2, d_ff=48, layers=3))
    with pytest.raises(ModelFileError, match="T5 blocks or attention sizes are inconsistent"):
        load_t5_model(_rewritten(t5, tmp_path, drop="encoder.block.1.", name="t5gap.safetensors"))
    clip = write_random_clip_checkpoint(tmp_path / "clip.safetensors", CLIPTextConfig(
        vocab_size=300, width=32, layers=3, intermediate=48, positions=77, eos_token_id=299))
    with pytest.raises(ModelFileError, match="not numbered 0..N-1"):
        load_clip_model(_rewritten(clip, tmp_path, drop="encoder.layers.1.", name="clipgap.safetensors"))


def test_decode_refuses_latents_of_another_channel_count(tiny_vae):
    with pytest.raises(ValueError, match="decode expects latents of shape"):
        tiny_vae.decode(torch.zeros(1, TINY_AUTOENCODER.z_channels + 1, 4, 4))


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_a_transformer_without_double_blocks_is_not_taken_for_flux_1(tmp_path, layout):
    from comfyui_krea.model_loader.flux import load_flux, write_random_flux_checkpoint

    config = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64,
                        num_heads=4, depth=0, depth_single_blocks=2, axes_dim=(4, 6, 6))
    path = write_random_flux_checkpoint(tmp_path / "single.safetensors", config, layout=layout)
    with pytest.raises(ModelFileError, match="not a FLUX.1 transformer"):
        load_flux(path)


# ------------------------------------------------------------------------------ VAE memory plan and tiles

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_the_estimate_adds_each_devices_measured_overhead_to_the_activations():
    elements = tiling.activation_elements(TINY_AUTOENCODER, "decode", 12, 16)
    assert tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 12, 16, torch.float32, CPU) == int(
        elements * 4 * tiling._CPU_OVERHEAD)
    assert tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 12, 16, torch.bfloat16, CUDA) == int(
        elements * 2 * tiling._CUDA_OVERHEAD)
    assert tiling._CUDA_OVERHEAD != tiling._CPU_OVERHEAD


def _plan(*args, config=TINY_AUTOENCODER, **kwargs):
    plan = tiling.plan(config, "decode", *args, **kwargs)
    assert all(type(v) is int for v in (plan.batch_chunk, plan.overlap)), plan  # never float pixels
    assert plan.tile is None or type(plan.tile) is int, plan
    return (plan.batch_chunk, plan.tile, plan.overlap)


def test_explicit_tiles_in_image_pixels_become_latent_pixels():
    assert _plan(2, 40, 40, torch.float32, CPU, tile_size=256) == (2, 32, 8)  # overlap: a quarter of the tile
    assert _plan(2, 40, 40, torch.float32, CPU, tile_size=256, tile_overlap=32) == (2, 32, 4)
    assert _plan(2, 40, 40, torch.float32, CPU, tile_size=256, tile_overlap=0) == (2, 32, 0)
    assert _plan(2, 40, 40, torch.float32, CPU, tile_size=256, tile_overlap=248) == (2, 32, 31)
    one_level = AutoEncoderConfig(ch=32, ch_mult=(1,), z_channels=16)  # downscale factor 1: any side works
    assert _plan(1, 4, 4, torch.float32, CPU, tile_size=1, tile_overlap=0, config=one_level) == (1, 1, 0)


@pytest.mark.parametrize("tile_size,tile_overlap,message", [
    (0, None, "tile_size must"), (-8, 0, "tile_size must"), (12, 0, "tile_size must"),
    (256, -8, "tile_overlap must"), (256, 12, "tile_overlap must"), (256, 256, "tile_overlap must"),
    (256, 264, "tile_overlap must")])
def test_explicit_tiles_off_the_grid_are_refused(tile_size, tile_overlap, message):
    with pytest.raises(ValueError, match=message):
        _plan(1, 40, 40, torch.float32, CPU, tile_size=tile_size, tile_overlap=tile_overlap)


def test_a_budget_that_holds_the_estimate_exactly_is_enough():
    for dtype in (torch.float32, torch.bfloat16):
        whole = tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 40, 40, dtype, CPU)
        assert _plan(3, 40, 40, dtype, CPU, budget_bytes=3 * whole) == (3, None, 0)
        assert _plan(3, 40, 40, dtype, CPU, budget_bytes=3 * whole - 1) == (2, None, 0)
        assert _plan(3, 40, 40, dtype, CPU, budget_bytes=whole) == (1, None, 0)
        # The largest automatic tile that fits: 512 px (64 latent pixels) when its estimate is the budget.
        fits = tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 64, 64, dtype, CPU)
        assert _plan(1, 160, 160, dtype, CPU, budget_bytes=fits) == (1, 64, 8)
        assert _plan(1, 160, 160, dtype, CPU, budget_bytes=fits - 1) == (1, 48, 6)  # then 384 px


@pytest.mark.parametrize("levels,tile,overlap", [(4, 32, 4), (6, 8, 1), (7, 4, 1)])
def test_when_nothing_fits_the_smallest_tile_is_tried_with_an_eighth_of_it_shared(levels, tile, overlap):
    config = AutoEncoderConfig(ch=8, ch_mult=(1,) * levels, z_channels=16)  # downscale factor 2**(levels-1)
    assert _plan(1, 400, 400, torch.float32, CPU, budget_bytes=1, config=config) == (1, tile, overlap)


def test_the_budget_is_a_share_of_the_free_memory_per_device_type(monkeypatch):
    for device, share, other in ((CPU, tiling._CPU_BUDGET_SHARE, tiling._CUDA_BUDGET_SHARE),
                                 (CUDA, tiling._CUDA_BUDGET_SHARE, tiling._CPU_BUDGET_SHARE)):
        whole = tiling.estimate_bytes(TINY_AUTOENCODER, "decode", 40, 40, torch.float32, device)
        free = int(whole / ((share + other) / 2))  # between the two shares
        monkeypatch.setattr(tiling, "available_memory", lambda d, free=free: free)
        expected = (1, None, 0) if share > other else (1, 32, 4)
        assert _plan(1, 40, 40, torch.float32, device) == expected, device


def test_tiles_and_batch_chunks_run_on_the_inputs_device_in_float32():
    x = torch.empty(2, 4, 20, 24, device="meta")  # another device than the CPU that builds the blend weights
    out = tiling.run(tiling.TilePlan(1, 8, 2), x, lambda t: F.interpolate(t, scale_factor=2.0), in_scale=1,
                     out_scale=2, out_channels=4)
    assert (out.device.type, out.dtype, out.shape) == ("meta", torch.float32, (2, 4, 40, 48))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = tiling.run(tiling.TilePlan(1, 8, 2), torch.randn(1, 4, 20, 24, dtype=torch.float32),
                         lambda t: t.repeat_interleave(2, -1).repeat_interleave(2, -2), in_scale=1, out_scale=2,
                         out_channels=4)
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("batch,chunk", [(4, 2), (5, 2), (3, 3)])
def test_batch_chunks_are_all_run_in_order_and_reported(batch, chunk):
    x = torch.randn(batch, 2, 6, 6)
    calls = []
    out = tiling.run(tiling.TilePlan(chunk, None, 0), x, lambda t: t * 2 + t.shape[0], in_scale=1, out_scale=1,
                     out_channels=2, callback=lambda done, total: calls.append((done, total)))
    parts = [x[i:i + chunk] * 2 + len(x[i:i + chunk]) for i in range(0, batch, chunk)]
    torch.testing.assert_close(out, torch.cat(parts), rtol=0, atol=0)
    count = len(parts)
    assert calls == [(i, count) for i in range(1, count + 1)]


@pytest.mark.parametrize("length,max_tile,overlap,scale", [(9, 4, 1, 1), (40, 12, 3, 1), (40, 12, 3, 8),
                                                           (23, 8, 1, 2), (16, 8, 0, 2)])
def test_the_blend_weights_of_neighbouring_tiles_add_up_to_one(length, max_tile, overlap, scale):
    tile, starts = tiling.axis_tiles(length, max_tile, overlap)
    assert len(starts) >= 3 or overlap == 0
    total = torch.zeros(length * scale)
    for i, start in enumerate(starts):
        ramp = tiling._ramp(starts, i, tile, scale)
        assert ramp.dtype == torch.float32 and float(ramp.min()) > 0
        total[start * scale:(start + tile) * scale] += ramp
    torch.testing.assert_close(total, torch.ones_like(total))


def test_untiled_decode_of_a_bf16_vae_returns_float32(tiny_vae):
    import copy

    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    out = copy.deepcopy(tiny_vae).to(torch.bfloat16).decode(latents)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 32, 32)
    assert rel_err(out, tiny_vae.decode(latents)) < 0.05


def test_a_bf16_vae_plans_with_its_own_element_size(tiny_vae, monkeypatch):
    import copy

    half = copy.deepcopy(tiny_vae).to(torch.bfloat16)
    # 40 latent pixels a side: more than the smallest automatic tile (32), so a wrong estimate means tiles.
    for kind, size in (("decode", (1, 16, 40, 40)), ("encode", (1, 3, 320, 320))):
        latent_side = 40
        need = tiling.estimate_bytes(TINY_AUTOENCODER, kind, latent_side, latent_side, torch.bfloat16, CPU)
        monkeypatch.setattr(tiling, "available_memory", lambda d, need=need: int(need / tiling._CPU_BUDGET_SHARE) + 8)
        calls: list[tuple[int, int]] = []
        run = half.decode if kind == "decode" else half.encode
        run(torch.zeros(size), callback=lambda *a, calls=calls: calls.append(a))
        assert calls == [(1, 1)], kind  # one untiled pass: the bf16 estimate (half the float32 one) fits


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_an_explicit_tile_overlap_is_used(tiny_vae, kind):
    # 15 latent pixels in tiles of 8: an overlap of 1 needs 2 tiles a side, the default (2) would need 3.
    calls = []
    if kind == "decode":
        tiny_vae.decode(torch.zeros(1, 16, 15, 15), tile_size=64, tile_overlap=8, callback=lambda *a: calls.append(a))
    else:
        tiny_vae.encode(torch.zeros(1, 3, 120, 120), tile_size=64, tile_overlap=8, callback=lambda *a: calls.append(a))
    assert calls[-1] == (4, 4)


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


@pytest.fixture(scope="module")
def small_text_encoders(tmp_path_factory):
    from comfyui_krea.model_loader.text_encoders import (
        CLIPTextConfig,
        T5EncoderConfig,
        load_clip_model,
        write_random_clip_checkpoint,
        write_random_t5_checkpoint,
    )

    folder = tmp_path_factory.mktemp("text")
    clip = load_clip_model(write_random_clip_checkpoint(folder / "clip.safetensors", CLIPTextConfig(
        vocab_size=300, width=32, layers=2, intermediate=48, positions=77, eos_token_id=299), seed=4))
    t5 = write_random_t5_checkpoint(folder / "t5.safetensors", T5EncoderConfig(
        vocab_size=300, d_model=32, d_kv=8, heads=2, d_ff=48, layers=2), seed=4)
    return clip, t5


def test_clip_computes_in_the_dtype_asked_from_float32_tables(small_text_encoders):
    clip, _ = small_text_encoders
    ids = torch.tensor([[298, 5, 17, 299, 0], [298, 40, 299, 0, 0]])
    with torch.no_grad():
        full, full_pooled = clip(ids)
        half, half_pooled = clip(ids, torch.bfloat16)
    assert half.dtype == half_pooled.dtype == torch.bfloat16
    assert rel_err(half, full) < 0.05 and rel_err(half_pooled, full_pooled) < 0.05


def test_t5_linears_compute_in_the_dtype_asked_and_fp16_attention_outputs_in_float32(small_text_encoders):
    from comfyui_krea.model_loader.text_encoders import load_t5_model

    model = load_t5_model(small_text_encoders[1])
    seen: dict[str, list] = {}
    block = model.encoder.block[1]
    for name, module in (("wi_0", block.layer[1].DenseReluDense.wi_0), ("o", block.layer[0].SelfAttention.o)):
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0].dtype))
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model(ids, dtype)
    assert seen["wi_0"] == [torch.float32, torch.bfloat16, torch.float16]
    assert seen["o"] == [torch.float32, torch.bfloat16, torch.float32]  # fp16 attention outputs overflow in o


def test_an_unscaled_fp8_t5_file_runs_like_its_values_in_float32(small_text_encoders, tmp_path):
    # t5xxl_fp8_e4m3fn.safetensors: every tensor in fp8, the token table included, no scales.
    from safetensors.torch import load_file, save_file

    from comfyui_krea.model_loader.text_encoders import load_t5_model

    state = load_file(small_text_encoders[1])
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    save_file(fp8, tmp_path / "t5_fp8.safetensors")
    save_file({k: v.float() for k, v in fp8.items()}, tmp_path / "t5_fp8_values.safetensors")
    ids = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = load_t5_model(tmp_path / "t5_fp8.safetensors")(ids)
        want = load_t5_model(tmp_path / "t5_fp8_values.safetensors")(ids)
    torch.testing.assert_close(got, want)


def test_a_diffusers_transformer_with_one_double_block_and_no_qkv_bias_loads(tmp_path):
    import dataclasses

    from comfyui_krea.model_loader.flux import load_flux
    from comfyui_krea.model_loader.flux.random_weights import write_random_flux_checkpoint

    config = dataclasses.replace(TINY_FLUX, depth=1, qkv_bias=False)
    model = load_flux(write_random_flux_checkpoint(tmp_path / "t.safetensors", config, layout="diffusers"))
    assert model.config.depth == 1 and model.config.qkv_bias is False


def test_a_t5_file_without_its_token_table_is_called_incomplete(small_text_encoders, tmp_path):
    from comfyui_krea.model_loader.checkpoints import open_checkpoint
    from comfyui_krea.model_loader.text_encoders import t5

    path = _rewritten(small_text_encoders[1], tmp_path, drop="shared.weight", name="no_table.safetensors")
    with pytest.raises(ModelFileError, match="token embedding"):
        t5.config_from_checkpoint(open_checkpoint(path))


def test_a_diffusers_layout_error_names_the_file(tmp_path):
    from safetensors.torch import load_file

    from comfyui_krea.model_loader.flux.random_weights import write_random_flux_checkpoint

    diffusers = load_file(write_random_flux_checkpoint(tmp_path / "d.safetensors", TINY_FLUX, layout="diffusers"))
    diffusers.pop(sorted(diffusers)[0])
    with pytest.raises(ModelFileError, match=r"^my_diffusers\.safetensors \(diffusers layout\) is missing"):
        layouts.plan_flux_layout(StateDictSource(diffusers), "my_diffusers.safetensors")
