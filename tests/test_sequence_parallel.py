"""Sequence parallelism (sampling/sequence_parallel.py) in real processes on the gloo backend: 2 and 4 ranks give the
latents of one process (rel < 1e-6 in float32), with and without step caching, for token counts that the rank count
does not divide; every rank ends with the same latents and reuses the same steps; the padding is invisible (padded
with NaN, the result is bit for bit that of zero padding). Plus the pieces that need no process group: the token
split, the rank-count rule, and the step cache's sums."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from comfyui_krea.sampling.sequence_parallel import TokenShards, rank_count_problem
from comfyui_krea.sampling.step_cache import l1_change_sums
from conftest import rel_err
from sequence_parallel_worker import CASES, SP_FLUX, run_single, sp_model, worker


@pytest.fixture(scope="module")
def single_process():
    """Every case sampled by one process with the plain sampler: the reference."""
    model = sp_model()
    return {name: run_single(case, model) for name, case in CASES.items()}


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_give_the_latents_of_one_process(ranks, single_process, tmp_path):
    assert SP_FLUX.num_heads % ranks == 0
    mp.spawn(worker, args=(ranks, str(tmp_path / "init"), str(tmp_path)), nprocs=ranks, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(ranks)]
    for rank in range(ranks):  # the cache's sums over the shards, all-reduced: those of the whole tensors
        sharded, whole = per_rank[rank]["sums"]
        assert torch.allclose(sharded, whole, rtol=1e-12, atol=0)
    for name, case in CASES.items():
        expected, expected_reused = single_process[name]
        latents, reused = per_rank[0][name]
        assert latents.shape == expected.shape
        assert rel_err(latents, expected) < 1e-6, name
        # The cache decides as one process does; the cached cases do reuse steps.
        assert reused == expected_reused, name
        assert (len(reused) > 0) == (case.threshold > 0), name
        for other in per_rank[1:]:  # every rank holds the same latents and skipped the same steps
            assert torch.equal(other[name][0], latents) and other[name][1] == reused, name
    # Padding with NaN changes nothing: padded tokens never reach a real one.
    nan_padded = per_rank[0]["48x80 cached, NaN padding"][0]
    assert torch.isfinite(nan_padded).all() and torch.equal(nan_padded, per_rank[0]["48x80 cached"][0])


def test_tokens_are_padded_at_the_end_and_cut_in_equal_chunks():
    shards = TokenShards(text=7, image=15, ranks=4)
    assert (shards.text_chunk, shards.image_chunk) == (2, 4)
    assert [shards.real_image_tokens(r) for r in range(4)] == [4, 4, 4, 3]
    image = torch.arange(15.0).view(1, 15, 1)
    parts = [shards.image_part(image, r) for r in range(4)]
    assert torch.equal(torch.cat(parts, dim=1)[:, :15], image) and parts[3][0, -1, 0] == 0  # zero padding last
    text = torch.arange(1, 8.0).view(1, 7, 1)
    assert [shards.text_part(text, r).flatten().tolist() for r in range(4)] == [[1, 2], [3, 4], [5, 6], [7, 0]]


def test_rank_counts_must_divide_the_heads():
    for ranks in (1, 2, 3, 4, 6, 8, 12, 24):
        assert rank_count_problem(24, ranks) is None
    problem = rank_count_problem(24, 5)
    assert problem is not None and "1, 2, 3, 4, 6, 8, 12, 24" in problem and "not 5" in problem


def test_step_cache_sums_add_up_over_shards_and_give_the_mean_ratio():
    gen = torch.Generator().manual_seed(0)
    current, previous = torch.randn(2, 10, 6, generator=gen), torch.randn(2, 10, 6, generator=gen)
    whole = l1_change_sums(current, previous)
    parts = l1_change_sums(current[:, :3], previous[:, :3]) + l1_change_sums(current[:, 3:], previous[:, 3:])
    assert torch.allclose(whole, parts, rtol=1e-12, atol=0)
    mean_ratio = ((current - previous).abs().mean() / previous.abs().mean()).item()
    assert abs((whole[0] / whole[1]).item() - mean_ratio) < 1e-6
