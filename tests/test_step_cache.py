"""Step caching (acceleration regular/high): the reuse rule on a model whose first-block residual is known (a
change strictly below the threshold reuses, threshold 0 never does, a new token count never does), exactness at
threshold 0, reuse on slowly changing models, no state shared between runs; and GPU acceleration's compiled blocks
(arguments passed through, the backend asked for, eager after a failed compilation)."""
from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch

from comfyui_krea.model_loader.flux import load_flux, write_random_flux_checkpoint
from comfyui_krea.sampling import gpu_acceleration
from comfyui_krea.sampling.denoise import GenerationSettings, generate
from comfyui_krea.sampling.step_cache import THRESHOLDS, CacheReport, StepCache, l1_change_sums
from conftest import TINY_FLUX, rel_err

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A model whose output changes little from step to step: its timestep embedding is damped."""
    model = load_flux(write_random_flux_checkpoint(tmp_path_factory.mktemp("cache") / "f.safetensors", TINY_FLUX,
                                                   seed=1))
    with torch.no_grad():
        for p in model.time_in.parameters():
            p.mul_(0.1)
    return model


def cond(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 7, 32, generator=gen), torch.randn(1, 16, generator=gen)


SETTINGS = GenerationSettings(width=64, height=64, num_steps=20, guidance=4.5, seed=0, num_images=1)


def test_none_runs_no_cache_and_threshold_zero_wrapper_is_exact(slow_model):
    txt, vec = cond()
    plain = generate(slow_model, txt, vec, SETTINGS, CPU, torch.float32)
    assert plain.cache is None and THRESHOLDS["none"] == 0.0
    # The cache wrapper with threshold 0 computes every step through its split path: bit-identical.
    x = torch.randn(1, 16, 64)
    ids = torch.zeros(1, 16, 3)
    args = (x, ids, txt, torch.zeros(1, 7, 3), torch.tensor([0.7]), vec, torch.tensor([4.5]))
    wrapper = StepCache(slow_model, 0.0, total_steps=3)
    for _ in range(3):
        assert torch.equal(wrapper.forward_orig(*args), slow_model.forward_orig(*args))
    assert wrapper.report.reused_steps == 0 and wrapper.report.full_steps == 3


def test_regular_and_high_reuse_steps_and_stay_close(slow_model):
    txt, vec = cond()
    reference = generate(slow_model, txt, vec, SETTINGS, CPU, torch.float32).latents
    regular = generate(slow_model, txt, vec, SETTINGS, CPU, torch.float32, cache_threshold=THRESHOLDS["regular"])
    high = generate(slow_model, txt, vec, SETTINGS, CPU, torch.float32, cache_threshold=THRESHOLDS["high"])
    assert regular.cache.reused_steps > 0
    assert high.cache.reused_steps > regular.cache.reused_steps
    for run in (regular, high):
        assert run.cache.full_steps + run.cache.reused_steps == SETTINGS.num_steps
        assert 0 not in run.cache.reused_at and SETTINGS.num_steps - 1 not in run.cache.reused_at
    # Measured on this model: regular ~0.9%, high ~2.3% relative difference of the final latents.
    assert rel_err(regular.latents, reference) < 0.02
    assert rel_err(high.latents, reference) < 0.05
    assert rel_err(regular.latents, reference) <= rel_err(high.latents, reference)


def test_no_state_leaks_between_runs(slow_model):
    txt, vec = cond()
    threshold = THRESHOLDS["high"]
    first = generate(slow_model, txt, vec, SETTINGS, CPU, torch.float32, cache_threshold=threshold)
    # Another prompt, another size, another batch size, an image-to-image start in between.
    other_txt, other_vec = cond(5)
    generate(slow_model, other_txt, other_vec, GenerationSettings(width=96, height=64, num_steps=6, guidance=3.0,
                                                                  seed=3, num_images=2), CPU, torch.float32,
             cache_threshold=threshold)
    generate(slow_model, txt, vec, GenerationSettings(width=64, height=64, num_steps=8, guidance=4.5, seed=0,
                                                      num_images=1, strength=0.5), CPU, torch.float32,
             init_latent=torch.randn(1, 16, 8, 8), cache_threshold=threshold)
    again = generate(slow_model, txt, vec, SETTINGS, CPU, torch.float32, cache_threshold=threshold)
    assert torch.equal(first.latents, again.latents)
    assert first.cache.reused_at == again.cache.reused_at


def test_image_to_image_counts_only_the_steps_it_runs(slow_model):
    txt, vec = cond()
    settings = GenerationSettings(width=64, height=64, num_steps=20, guidance=4.5, seed=0, num_images=1,
                                  strength=0.5)
    run = generate(slow_model, txt, vec, settings, CPU, torch.float32, init_latent=torch.randn(1, 16, 8, 8),
                   cache_threshold=THRESHOLDS["high"])
    assert run.steps == 10
    assert run.cache.full_steps + run.cache.reused_steps == 10
    assert 9 not in run.cache.reused_at


# -------------------------------------------------------- the decision rule, on a model with a known residual

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


def test_the_change_is_relative_even_for_a_residual_whose_sum_is_below_one():
    # sum |R| = 300 / 2**14, about 0.018: a change of half of it is 0.009 in absolute terms but 0.5 relative
    model = _AffineFlux(_residual() * 2.0**-14)
    x = torch.zeros(2, 3, 4)
    cache = StepCache(model, threshold=0.25, total_steps=5)
    _call(cache, x)
    model.scale = 1.5
    _call(cache, x)
    assert cache.report.reused_steps == 0 and cache.report.full_steps == 2


def test_change_sums_are_float64_where_float32_would_round():
    # 2**24 + 1 has no float32: both sums are taken in float64, so the ratio does not lose the last unit
    previous = torch.tensor([[2.0**24, 1.0]])
    current = torch.tensor([[2.0**24 + 2, 1.0]])
    sums = l1_change_sums(current, previous)
    assert sums.dtype == torch.float64 and sums.tolist() == [2.0, 2.0**24 + 1]


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


# ------------------------------------------------------------------------------------------- GPU acceleration

def test_gpu_acceleration_is_a_no_op_on_cpu(slow_model):
    from comfyui_krea.sampling.gpu_acceleration import gpu_acceleration

    with gpu_acceleration(slow_model, CPU) as used:
        assert used == []
        assert all("forward" not in block.__dict__ for block in slow_model.double_blocks)


@pytest.fixture
def compile_state(monkeypatch):
    """gpu_acceleration with no compiled forwards and no earlier failure; dynamo's caches emptied."""
    from comfyui_krea.sampling import gpu_acceleration

    monkeypatch.setattr(gpu_acceleration, "_compile_failed", False)
    monkeypatch.setattr(gpu_acceleration, "_compiled", {})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return gpu_acceleration


def test_failed_compilation_falls_back_to_eager(slow_model, compile_state):
    gpu_acceleration = compile_state
    block = slow_model.single_blocks[0]

    def broken(*args, **kwargs):
        raise RuntimeError("inductor backend unavailable")

    forward = gpu_acceleration._guarded(block, broken)
    x, vec = torch.randn(1, 23, 32), torch.randn(1, 32)
    pe = slow_model.pe_embedder(torch.zeros(1, 23, 3))
    assert torch.equal(forward(x, vec, pe), block(x, vec, pe))
    assert gpu_acceleration._compile_failed


class _Block(torch.nn.Module):
    def forward(self, x, vec=None, pe=None):
        return ("eager", self, x, vec, pe)


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


def test_blocks_trace_and_run_compiled_then_restore(slow_model, compile_state):
    # aot_eager exercises dynamo's tracing of our blocks (graph breaks, guards) without a C++ build.
    gpu_acceleration = compile_state
    txt, vec = cond()
    settings = GenerationSettings(width=32, height=32, num_steps=2, guidance=4.5, seed=0, num_images=1)
    eager = generate(slow_model, txt, vec, settings, CPU, torch.float32).latents
    with gpu_acceleration.compiled_blocks(slow_model, backend="aot_eager") as compiled:
        assert compiled
        assert all("forward" in b.__dict__ for b in slow_model.single_blocks)
        fast = generate(slow_model, txt, vec, settings, CPU, torch.float32).latents
    assert not gpu_acceleration._compile_failed  # no fallback to eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo really compiled the blocks
    assert all("forward" not in b.__dict__ for b in [*slow_model.double_blocks, *slow_model.single_blocks])
    assert torch.allclose(fast, eager, atol=1e-5)


def test_compiled_blocks_share_graphs_across_blocks_and_sizes(tmp_path, compile_state):
    # Full depth (19 double + 38 single blocks), narrow width: every block and every size must reuse a
    # handful of graphs. One graph per block, or per size, would exceed dynamo's recompile limit (8) and
    # silently run the remaining blocks or sizes uncompiled.
    gpu_acceleration = compile_state
    deep = dataclasses.replace(TINY_FLUX, depth=19, depth_single_blocks=38)
    model = load_flux(write_random_flux_checkpoint(tmp_path / "deep.safetensors", deep, seed=2))
    counters = torch._dynamo.utils.counters
    txt, vec = cond()
    graphs_after = []
    for width, height in [(32, 32), (48, 32), (64, 64), (32, 80), (96, 48), (80, 80)]:
        settings = GenerationSettings(width=width, height=height, num_steps=1, guidance=4.5, seed=0, num_images=1)
        eager = generate(model, txt, vec, settings, CPU, torch.float32).latents
        with gpu_acceleration.compiled_blocks(model, backend="eager"):
            fast = generate(model, txt, vec, settings, CPU, torch.float32).latents
        assert torch.allclose(fast, eager, atol=1e-5)
        graphs_after.append(counters["stats"]["unique_graphs"])
    assert not gpu_acceleration._compile_failed
    assert counters["frames"]["total"] == counters["frames"]["ok"]  # no frame fell back to eager
    assert graphs_after[0] == 2  # one graph per block kind serves all 57 blocks
    assert graphs_after[-1] == graphs_after[2] <= 6  # new sizes stopped costing compilations


def test_compiled_blocks_serve_a_new_model_and_free_the_old_one(tmp_path, compile_state):
    # Switching models after an accelerated run must free the old one (on a GPU: 12-24 GB of weights), and
    # the kept compiled forwards must compute with the new model's weights, not the old ones.
    gpu_acceleration = compile_state
    txt, vec = cond()
    settings = GenerationSettings(width=32, height=32, num_steps=2, guidance=4.5, seed=0, num_images=1)
    old = load_flux(write_random_flux_checkpoint(tmp_path / "old.safetensors", TINY_FLUX, seed=3))
    with gpu_acceleration.compiled_blocks(old, backend="aot_eager"):
        generate(old, txt, vec, settings, CPU, torch.float32)
    assert len(gpu_acceleration._compiled) == 2  # one compiled forward per block class, kept
    blocks = [weakref.ref(b) for b in [*old.double_blocks, *old.single_blocks]]
    del old
    gc.collect()
    assert all(block() is None for block in blocks)

    new = load_flux(write_random_flux_checkpoint(tmp_path / "new.safetensors", TINY_FLUX, seed=4))
    eager = generate(new, txt, vec, settings, CPU, torch.float32).latents
    with gpu_acceleration.compiled_blocks(new, backend="aot_eager"):
        fast = generate(new, txt, vec, settings, CPU, torch.float32).latents
    assert not gpu_acceleration._compile_failed and len(gpu_acceleration._compiled) == 2
    assert torch.allclose(fast, eager, atol=1e-5)
