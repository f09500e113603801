"""Loading CLIP-L and T5 files of other sizes: every size is read off the file (not CLIP-L's or T5-XXL's defaults),
files with a gap in their layers or without T5's token table are refused, and each encoder computes in the dtype
asked for (per device and stored dtype; fp16 activations clamped and T5's fp16 attention outputs kept in float32)."""
from __future__ import annotations

import pytest
import torch

from comfyui_krea.model_loader import ModelFileError
from conftest import rel_err

# ----------------------------------------------------------------------------------- sizes read off the files

def test_t5_config_with_an_attention_width_other_than_the_model_width(tmp_path):
    from comfyui_krea.model_loader.checkpoints import Checkpoint
    from comfyui_krea.model_loader.text_encoders import T5EncoderConfig
    from comfyui_krea.model_loader.text_encoders.random_weights import write_random_t5_checkpoint
    from comfyui_krea.model_loader.text_encoders.t5 import config_from_checkpoint

    config = T5EncoderConfig(d_model=64, d_kv=8, heads=4, d_ff=96, layers=2)  # inner width 32, not 64
    path = write_random_t5_checkpoint(tmp_path / "t5.safetensors", config)
    assert config_from_checkpoint(Checkpoint(path)) == config


def test_clip_config_other_than_the_defaults_is_read_off_the_shapes(tmp_path):
    from comfyui_krea.model_loader.checkpoints import Checkpoint
    from comfyui_krea.model_loader.text_encoders import CLIPTextConfig
    from comfyui_krea.model_loader.text_encoders.clip import config_from_checkpoint
    from comfyui_krea.model_loader.text_encoders.random_weights import write_random_clip_checkpoint

    config = CLIPTextConfig(vocab_size=1000, width=64, layers=2, intermediate=96, positions=40, eos_token_id=999)
    path = write_random_clip_checkpoint(tmp_path / "clip.safetensors", config)
    assert config_from_checkpoint(Checkpoint(path)) == config


def test_t5_sizes_come_from_the_file_not_from_t5_xxl(tmp_path):
    from comfyui_krea.model_loader.text_encoders import T5EncoderConfig, load_t5_model, write_random_t5_checkpoint

    config = T5EncoderConfig(vocab_size=300, d_model=32, d_kv=8, heads=2, d_ff=48, layers=2, relative_buckets=16)
    model = load_t5_model(write_random_t5_checkpoint(tmp_path / "t5.safetensors", config))
    assert (model.config.vocab_size, model.config.relative_buckets, model.config.layers) == (300, 16, 2)
    assert not any(p.requires_grad for p in model.parameters())  # frozen, as every loaded model


# ------------------------------------------------------------------------------------------- incomplete files

def _rewritten(path, tmp_path, drop: str | None = None, name: str = "edited.safetensors"):
    """The file again, without the tensors whose key contains `drop`."""
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(path).items() if drop is None or drop not in k}
    save_file(state, tmp_path / name)
    return tmp_path / name


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


def test_a_t5_file_without_its_token_table_is_called_incomplete(small_text_encoders, tmp_path):
    from comfyui_krea.model_loader.checkpoints import open_checkpoint
    from comfyui_krea.model_loader.text_encoders import t5

    path = _rewritten(small_text_encoders[1], tmp_path, drop="shared.weight", name="no_table.safetensors")
    with pytest.raises(ModelFileError, match="token embedding"):
        t5.config_from_checkpoint(open_checkpoint(path))


# --------------------------------------------------------------------------------- the dtype each computes in

@pytest.mark.parametrize("available,bf16,device,stored,expected", [
    (True, True, "cuda", torch.bfloat16, torch.bfloat16), (True, False, "cuda", torch.bfloat16, torch.float16),
    (True, True, "cuda", torch.float16, torch.float16), (True, True, "cuda", torch.float8_e4m3fn, torch.float16),
    (True, True, "cpu", torch.bfloat16, torch.float32), (True, True, "mps", torch.float16, torch.float32)])
def test_text_encoder_compute_dtype(monkeypatch, available, bf16, device, stored, expected):
    from comfyui_krea.model_loader.compute_dtypes import text_encoder_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert text_encoder_compute_dtype(torch.device(device), stored) is expected


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


def test_t5_clamps_fp16_activations_only():
    from comfyui_krea.model_loader.text_encoders import t5

    big = torch.finfo(torch.float16).max
    half = torch.tensor([-float("inf"), -big, 1.5, big, float("inf")], dtype=torch.float16)
    guarded = t5._fp16_guard(half)
    assert guarded.dtype == torch.float16 and torch.isfinite(guarded).all()
    assert guarded[2] == 1.5 and guarded[3] == -guarded[1] == t5._FP16_SAFE_MAX < big
    wide = torch.tensor([-1e30, 1e30], dtype=torch.float32)
    assert torch.equal(t5._fp16_guard(wide), wide)  # float32 and bf16 activations are left alone


def test_building_the_encoders_on_meta_leaves_torchs_compiler_unimported():
    # nn.Embedding's own init draws normal values; on the meta device that imports torch._dynamo (seconds at
    # every `run`). The tables are assigned from the file anyway, so they are built unfilled.
    import subprocess
    import sys

    code = ("import sys\n"
            "from comfyui_krea.model_loader.text_encoders import CLIPTextConfig, T5EncoderConfig\n"
            "from comfyui_krea.model_loader.text_encoders.clip import build_clip\n"
            "from comfyui_krea.model_loader.text_encoders.t5 import build_t5\n"
            "clip, t5 = build_clip(CLIPTextConfig()), build_t5(T5EncoderConfig())\n"
            "assert clip.text_model.embeddings.token_embedding.weight.is_meta\n"
            "assert t5.shared.weight.shape == (32128, 4096) and t5.shared.weight.is_meta\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
