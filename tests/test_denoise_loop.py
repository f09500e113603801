"""The denoising loop, against hand-made models whose right answer is known in closed form: Euler steps with the
exact flow-matching velocity land on the data, every step is called back with its x0 prediction, the model gets
its inputs in the compute dtype on the state's device, and the conditioning is checked (text (B, tokens, C) with
pooled (B, C)) and broadcast from one prompt to every image."""
from __future__ import annotations

import pytest
import torch

from comfyui_krea.sampling.denoise import (
    GenerationSettings,
    denoise,
    generate,
    model_velocity,
    validate_conditioning,
)
from comfyui_krea.sampling.latents import pack

# ------------------------------------------------------------- denoise: Euler steps and the callback contract

def test_denoise_with_the_true_velocity_lands_on_the_data_and_reports_every_step():
    # Flow matching: x_t = t * noise + (1 - t) * data, whose exact velocity is noise - data. Euler with it
    # reaches the data from any schedule, and every step's x0 prediction is the data itself.
    gen = torch.Generator().manual_seed(0)
    noise, data = torch.randn(2, 16, 4, 6, generator=gen), torch.randn(2, 16, 4, 6, generator=gen)
    v_true = pack(noise) - pack(data)
    timesteps = [1.0, 0.75, 0.4, 0.0]
    calls, seen = [], []

    def velocity(x, t_curr, t_next, step):
        calls.append((t_curr, t_next, step))
        torch.testing.assert_close(x, t_curr * pack(noise) + (1 - t_curr) * pack(data))
        return v_true

    out = denoise(pack(noise), timesteps, velocity, (4, 6), lambda s, total, x0: seen.append((s, total, x0)))
    torch.testing.assert_close(out, pack(data))
    assert calls == [(1.0, 0.75, 0), (0.75, 0.4, 1), (0.4, 0.0, 2)]
    assert [(s, total) for s, total, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    for _, _, x0 in seen:
        torch.testing.assert_close(x0, data)


class _Recorder(torch.nn.Module):
    """Stands in for the transformer: keeps what it was called with, answers -img."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        self.calls.append({"img": img, "timesteps": timesteps, "guidance": guidance})
        return -img


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_model_velocity_feeds_the_model_in_compute_dtype_on_the_state_device(device):
    # "float32 state in, float32 velocity out": the model sees compute_dtype tensors (here float64, which no
    # default would produce) on the device of the state.
    model = _Recorder()
    txt = torch.zeros(2, 5, 8, dtype=torch.float64, device=device)
    velocity = model_velocity(model, torch.zeros(2, 6, 3, device=device), txt, torch.zeros(2, 5, 3, device=device),
                              torch.zeros(2, 4, dtype=torch.float64, device=device), 3.5, torch.float64)
    x = torch.ones(2, 6, 64, device=device)
    v = velocity(x, 0.25, 0.0, 0)
    call = model.calls[0]
    assert v.dtype == torch.float32 and v.device == x.device
    for name in ("img", "timesteps", "guidance"):
        assert call[name].dtype == torch.float64, name
        assert call[name].device == x.device, name
    assert call["timesteps"].shape == (2,) and call["guidance"].shape == (2,)
    if device == "cpu":
        assert call["timesteps"].tolist() == [0.25, 0.25] and call["guidance"].tolist() == [3.5, 3.5]
        torch.testing.assert_close(v, -x)


# ---------------------------------------------------------- generate: what reaches the model and the callback

class _Still(torch.nn.Module):
    """A transformer that predicts zero velocity, and keeps the dtype and device of everything it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        args = {"img": img, "img_ids": img_ids, "txt": txt, "txt_ids": txt_ids, "timesteps": timesteps, "y": y,
                "guidance": guidance}
        self.seen.append({k: (v.dtype, v.device.type) for k, v in args.items()})
        return torch.zeros_like(img)


SMALL_SETTINGS = GenerationSettings(width=32, height=48, num_steps=3, guidance=4.5, seed=5, num_images=2)


def test_generate_with_zero_velocity_returns_the_noise_and_calls_back_each_step():
    # v = 0: the state never moves, so the latent is the seed's noise (float32, drawn on the CPU from
    # torch.manual_seed(seed)) mapped back to raw VAE space, z = x / 0.3611 + 0.1159, and every step's x0
    # prediction is that noise in model space.
    model, seen = _Still(), []
    txt, vec = torch.randn(1, 5, 8), torch.randn(1, 4)
    out = generate(model, txt, vec, SMALL_SETTINGS, torch.device("cpu"), torch.float32,
                   callback=lambda step, total, x0: seen.append((step, total, x0)))
    noise = torch.randn((2, 16, 6, 4), generator=torch.manual_seed(5), dtype=torch.float32)
    torch.testing.assert_close(out.latents, noise / 0.3611 + 0.1159)
    assert out.steps == 3 and out.cache is None
    assert [(s, t) for s, t, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    for _, _, x0 in seen:
        torch.testing.assert_close(x0, noise)


def test_generate_gives_the_model_compute_dtype_inputs():
    model = _Still()
    generate(model, torch.randn(1, 5, 8), torch.randn(1, 4), SMALL_SETTINGS, torch.device("cpu"), torch.float64)
    assert len(model.seen) == 3
    for name in ("img", "txt", "timesteps", "y", "guidance"):
        assert model.seen[0][name][0] == torch.float64, name


def test_generate_puts_every_model_input_on_the_device():
    # The meta device stands in for a GPU: all model inputs must be there (the final copy of the latents to
    # the CPU cannot be made from meta tensors, so the run ends in an error after the last step).
    model = _Still()
    with pytest.raises((NotImplementedError, RuntimeError)):
        generate(model, torch.randn(1, 5, 8), torch.randn(1, 4), SMALL_SETTINGS, torch.device("meta"),
                 torch.float32)
    assert len(model.seen) == 3
    for call in model.seen:
        assert {device for _, device in call.values()} == {"meta"}, call


# -------------- conditioning shapes: (B, tokens, 4096) text with (B, 768) pooled, one prompt or one per image

@pytest.mark.parametrize("txt_shape,vec_shape", [
    ((1, 7, 32), (2, 16)),   # batch of the pooled part differs from the text part
    ((2, 7, 32), (1, 16)),
    ((1, 32), (1, 16)),      # text embeddings without a token axis
    ((1, 7, 32), (1, 2, 16)),
])
def test_conditioning_of_the_wrong_shape_is_refused(txt_shape, vec_shape):
    with pytest.raises(ValueError, match="wrong shape"):
        validate_conditioning(torch.zeros(txt_shape), torch.zeros(vec_shape), num_images=2)


def test_one_prompt_per_image_is_kept_and_one_prompt_is_broadcast():
    txt, vec = torch.randn(2, 5, 32), torch.randn(2, 16)
    got_txt, got_vec = validate_conditioning(txt, vec, num_images=2)
    assert torch.equal(got_txt, txt) and torch.equal(got_vec, vec)
    got_txt, got_vec = validate_conditioning(txt[:1], vec[:1], num_images=3)
    assert got_txt.shape == (3, 5, 32) and got_vec.shape == (3, 16)
    assert all(torch.equal(got_txt[i], txt[0]) and torch.equal(got_vec[i], vec[0]) for i in range(3))
    with pytest.raises(ValueError, match="2 prompts but num_images is 3"):
        validate_conditioning(txt, vec, num_images=3)
