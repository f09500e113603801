"""What each process of the sequence-parallel tests runs (tests/test_sequence_parallel.py starts them with
torch.multiprocessing.spawn): join a gloo process group through a file, sample every case of CASES with
`generate_sequence_parallel`, and save the latents and the steps the cache reused to OUT/rank<r>.pt.

The model is a reduced FLUX with random weights in the real layout: 12 heads (so 2, 3, 4 and 6 ranks divide them),
unequal depths (2 double, 3 single blocks), its timestep embedding damped so that step caching reuses steps.
Every size gives token counts that 2 and 4 do not divide (text 7 or 5 tokens, image 15 or 35), so the padding
is exercised on every case.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from comfyui_krea.model_loader.flux import FluxConfig, FluxTransformer
from comfyui_krea.model_loader.flux.math import image_ids, text_ids
from comfyui_krea.model_loader.flux.random_weights import random_flux_tensor
from comfyui_krea.sampling import sequence_parallel
from comfyui_krea.sampling.denoise import GenerationSettings, generate
from comfyui_krea.sampling.step_cache import THRESHOLDS, l1_change_sums

SP_FLUX = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=96, num_heads=12,
                     depth=2, depth_single_blocks=3, axes_dim=(2, 2, 4))
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    settings: GenerationSettings
    text_tokens: int
    threshold: float
    nan_padding: bool = False  # pad with NaN instead of zeros: the padding must stay invisible


CASES = {
    "48x80": Case(GenerationSettings(width=48, height=80, num_steps=8, guidance=4.0, seed=3, num_images=1), 7, 0.0),
    "48x80 cached": Case(GenerationSettings(width=48, height=80, num_steps=8, guidance=4.0, seed=3, num_images=1), 7,
                         THRESHOLDS["high"]),
    "80x112 x2 cached": Case(GenerationSettings(width=80, height=112, num_steps=8, guidance=3.5, seed=9,
                                                num_images=2), 5, THRESHOLDS["high"]),
    "48x80 cached, NaN padding": Case(GenerationSettings(width=48, height=80, num_steps=8, guidance=4.0, seed=3,
                                                         num_images=1), 7, THRESHOLDS["high"], nan_padding=True),
}


def sp_model() -> FluxTransformer:
    """SP_FLUX with the pack's deterministic random weights (the same on every process), time embedding damped."""
    model = FluxTransformer(SP_FLUX).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            tensor.copy_(random_flux_tensor(key, tuple(tensor.shape), seed=1))
        for p in model.time_in.parameters():
            p.mul_(0.1)
    return model


def conditioning(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.text_tokens)
    return (torch.randn(1, case.text_tokens, SP_FLUX.context_in_dim, generator=gen),
            torch.randn(1, SP_FLUX.vec_in_dim, generator=gen))


def run_single(case: Case, model: FluxTransformer) -> tuple[torch.Tensor, list[int]]:
    """One process, the plain sampler: the reference."""
    txt, vec = conditioning(case)
    with torch.no_grad():
        result = generate(model, txt, vec, case.settings, CPU, torch.float32, cache_threshold=case.threshold)
    return result.latents, (result.cache.reused_at if result.cache else [])


def _nan_chunk(x: torch.Tensor, chunk: int, ranks: int, rank: int) -> torch.Tensor:
    padded = F.pad(x, (0, 0, 0, chunk * ranks - x.shape[1]), value=float("nan"))
    return padded[:, rank * chunk:(rank + 1) * chunk]


def cache_sums(model: FluxTransformer, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the step cache's sums of the sharded model over this rank's shards of two (2, 35, hidden) residuals,
    those of one process over the whole residuals); the shards' padding is NaN, which must not count."""
    case = CASES["80x112 x2 cached"]
    gen = torch.Generator().manual_seed(4)
    current, previous = (torch.randn(2, 35, SP_FLUX.hidden_size, generator=gen) for _ in range(2))
    txt, vec = conditioning(case)
    with sequence_parallel.sequence_parallel(model, None) as parallel, torch.no_grad():
        parallel.embed(torch.zeros(2, 35, 64), image_ids(2, 10, 14), txt.expand(2, -1, -1),
                       text_ids(2, txt.shape[1]), torch.full((2,), 0.5), vec.expand(2, -1), torch.full((2,), 3.5))
        shards = parallel.attention.shards
        local = [_nan_chunk(x, shards.image_chunk, world_size, rank) for x in (current, previous)]
        return parallel.l1_change_sums(*local), l1_change_sums(current, previous)


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # several processes share the test machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = sp_model()
        results = {}
        zero_padding = sequence_parallel._chunk
        for name, case in CASES.items():
            sequence_parallel._chunk = _nan_chunk if case.nan_padding else zero_padding
            txt, vec = conditioning(case)
            with torch.no_grad():
                result = sequence_parallel.generate_sequence_parallel(
                    model, txt, vec, case.settings, CPU, torch.float32, cache_threshold=case.threshold)
            results[name] = (result.latents, result.cache.reused_at if result.cache else [])
        sequence_parallel._chunk = zero_padding
        results["sums"] = cache_sums(model, rank, world_size)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
