"""Gaps in the sampling tests that mutation testing (bench/mutation.py) found, each checked against the
contract in design.md §3 or the module's own documented behaviour, with hand-made models whose right answer is
known in closed form."""
from __future__ import annotations

import pytest
import torch

from comfyui_krea.sampling import gpu_acceleration
from comfyui_krea.sampling.denoise import (
    GenerationSettings,
    denoise,
    generate,
    model_velocity,
    prepare,
    validate_conditioning,
)
from comfyui_krea.sampling.latents import make_noise, pack
from comfyui_krea.sampling.schedule import get_schedule, image_to_image_start
from comfyui_krea.sampling.step_cache import CacheReport, StepCache

# ---- denoise: Euler steps and the callback contract -------------------------------------------------------

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


# ---- noise: float32 on the CPU whatever the process defaults are (design.md §3) -------------------------

def test_noise_is_float32_cpu_even_under_other_torch_defaults():
    expected = torch.randn((2, 16, 3, 5), generator=torch.manual_seed(11), dtype=torch.float32, device="cpu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # another custom node may have changed the defaults
    try:
        with torch.device("meta"):
            noise = make_noise(11, 2, 3, 5)
    finally:
        torch.set_default_dtype(previous)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, expected)


# ---- generate: what reaches the model and the callback ---------------------------------------------------

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
    # v = 0: the state never moves, so the latent is the seed's noise (design.md §3) mapped back to raw VAE
    # space, z = x / 0.3611 + 0.1159, and every step's x0 prediction is that noise in model space.
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


# ---- conditioning shapes: (B, tokens, 4096) text with (B, 768) pooled, one prompt or one per image ----------

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


# ---- image-to-image start: one input image for a batch of images (design.md §3) ------------------------

def test_image_to_image_batch_from_one_image_noises_it_with_each_images_own_noise():
    width, height, steps, strength, seed = 48, 32, 10, 0.5, 7
    lh, lw = height // 8, width // 8
    image_latent = torch.randn(1, 16, lh, lw, generator=torch.Generator().manual_seed(1))
    settings = GenerationSettings(width=width, height=height, num_steps=steps, guidance=4.5, seed=seed,
                                  num_images=3, strength=strength)
    start, timesteps = prepare(settings, image_latent)
    # of a 10-step schedule the last int(10 * 0.5) = 5 steps run, from t0 * noise + (1 - t0) * image_latent
    full = get_schedule(steps, (lh // 2) * (lw // 2))
    assert timesteps == full[5:]
    t0 = full[5]
    noise = torch.randn((3, 16, lh, lw), generator=torch.manual_seed(seed), dtype=torch.float32)
    model_space = (image_latent - 0.1159) * 0.3611
    expected = t0 * noise + (1 - t0) * model_space
    assert start.shape == (3, (lh // 2) * (lw // 2), 64)
    torch.testing.assert_close(start, pack(expected))


# ---- schedule: the strength range -------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.0, -0.5, 1.0001, 1.5, 2.0])
def test_image_to_image_strength_outside_zero_one_is_refused(strength):
    with pytest.raises(ValueError, match="strength"):
        image_to_image_start(28, strength)


# ---- step cache: the decision rule of step_cache.py's docstring, on a model with a known residual ----------

class _AffineFlux(torch.nn.Module):
    """A Flux-shaped stand-in: the first double block adds scale * R to the image tokens (its residual is
    known), the remaining blocks double the tokens, `final` is the identity."""

    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.residual = residual
        self.scale = 1.0
        self.rest_calls = 0
        outer = self

        class First(torch.nn.Module):
            def forward(self, img, txt, vec, pe):
                return img + outer.scale * outer.residual, txt

        self.double_blocks = torch.nn.ModuleList([First()])

    def embed(self, img, img_ids, txt, txt_ids, timesteps, y, guidance):
        return img, txt, y, None

    def run_blocks(self, img, txt, vec, pe, first_double_block=0):
        assert first_double_block == 1
        self.rest_calls += 1
        return 2 * img

    def final(self, img, vec):
        return img


def _call(cache, x):
    z = torch.zeros(1)
    return cache.forward_orig(x, z, z, z, z, z, z)


def _residual():
    return torch.arange(1.0, 1.0 + 2 * 3 * 4).reshape(2, 3, 4)


def test_unchanged_first_block_residual_reuses_every_middle_step_and_only_those():
    model = _AffineFlux(_residual())
    cache = StepCache(model, threshold=0.5, total_steps=6)
    gen = torch.Generator().manual_seed(0)
    xs = [10 * torch.randn(2, 3, 4, generator=gen) for _ in range(6)]  # inputs change a lot; the residual not
    outs = [_call(cache, x) for x in xs]
    # the first and the last step run fully, every step between reuses
    assert cache.report.reused_at == [1, 2, 3, 4]
    assert (cache.report.full_steps, cache.report.reused_steps) == (2, 4)
    assert model.rest_calls == 2
    r = _residual()
    torch.testing.assert_close(outs[0], 2 * (xs[0] + r))
    torch.testing.assert_close(outs[5], 2 * (xs[5] + r))
    for i in range(1, 5):  # reused: this step's first block output plus what blocks 2.. added at step 0
        torch.testing.assert_close(outs[i], (xs[i] + r) + (xs[0] + r))


def test_reuse_needs_a_change_strictly_below_the_threshold():
    # relative L1 change of scale * R against R is exactly |scale - 1| (powers of two: no rounding)
    model = _AffineFlux(_residual())
    x = torch.zeros(2, 3, 4)
    cache = StepCache(model, threshold=0.25, total_steps=5)
    _call(cache, x)                      # step 0: full
    model.scale = 1.25
    _call(cache, x)                      # change 0.25, not below 0.25: full
    model.scale = 1.25 + 0.25 * 1.25 / 2  # change 0.125 against the step-1 residual: reused
    _call(cache, x)
    assert cache.report.reused_at == [2]
    model.scale = 2 * model.scale        # change 1.0: full
    _call(cache, x)
    assert cache.report.reused_at == [2] and cache.report.full_steps == 3


def test_threshold_zero_never_reuses_even_an_identical_step():
    model = _AffineFlux(_residual())
    cache = StepCache(model, threshold=0.0, total_steps=5)
    for _ in range(5):
        _call(cache, torch.ones(2, 3, 4))
    assert cache.report.reused_steps == 0 and model.rest_calls == 5


def test_a_new_token_count_is_never_served_from_the_cache():
    model = _AffineFlux(torch.ones(2, 3, 4))
    cache = StepCache(model, threshold=0.5, total_steps=5)
    _call(cache, torch.zeros(2, 3, 4))
    model.residual = torch.ones(2, 5, 4)  # same values, other shape: change 0, but nothing to reuse
    _call(cache, torch.zeros(2, 5, 4))
    assert cache.report.reused_steps == 0 and cache.report.full_steps == 2


def test_cache_report_summary_counts():
    report = CacheReport(full_steps=3, reused_steps=5, reused_at=[1, 2, 3, 4, 5])
    assert report.summary() == "3 of 8 steps computed fully, 5 reused"


# ---- GPU acceleration's compile wrapper: arguments reach the block --------------------------------------

class _Block(torch.nn.Module):
    def forward(self, x, vec=None, pe=None):
        return ("eager", self, x, vec, pe)


@pytest.fixture
def compile_state(monkeypatch):
    monkeypatch.setattr(gpu_acceleration, "_compile_failed", False)
    monkeypatch.setattr(gpu_acceleration, "_compiled", {})
    return gpu_acceleration


def test_guarded_forward_passes_positional_and_keyword_arguments(compile_state):
    block = _Block()

    def compiled(b, *args, **kwargs):
        return ("compiled", b, *args, kwargs)

    forward = gpu_acceleration._guarded(block, compiled)
    assert forward(1, vec=2, pe=3) == ("compiled", block, 1, {"vec": 2, "pe": 3})


def test_guarded_forward_falls_back_with_all_arguments_and_stays_eager(compile_state):
    block = _Block()

    def broken(*args, **kwargs):
        raise RuntimeError("no backend")

    forward = gpu_acceleration._guarded(block, broken)
    assert forward(1, vec=2, pe=3) == ("eager", block, 1, 2, 3)  # the failing call itself
    assert gpu_acceleration._compile_failed
    assert forward(4, vec=5, pe=6) == ("eager", block, 4, 5, 6)  # later calls skip compilation


def test_compiled_forward_uses_the_backend_asked_for(compile_state):
    import torch._dynamo

    torch._dynamo.reset()
    used = []

    def backend(gm, example_inputs):
        used.append(gm)
        return gm.forward

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) * 2

    block = Tiny()
    compiled = gpu_acceleration._compiled_forward(Tiny, backend)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(block, x), block.lin(x) * 2)
    assert used, "the requested backend was not used"
    assert gpu_acceleration._compiled_forward(Tiny, backend) is compiled  # one per (class, backend)
    torch._dynamo.reset()
