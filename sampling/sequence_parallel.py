"""One image across several GPUs: a FLUX transformer and a torch.distributed process group of N ranks -> a model
with the transformer's split forward whose steps take the full inputs and give the full velocity on every rank,
while each rank computes only its 1/N of the tokens.

The method is Ulysses-style sequence parallelism (all-to-all over heads), through the transformer's attention seam:

- The joint sequence is split, text and image tokens alike: each is padded at its end to a multiple of N and cut
  into N equal pieces; rank r holds text chunk r followed by image chunk r (`TokenShards`). The rotary `pe` is made
  from the position ids of the same tokens, so it is split exactly as they are. Everything but attention (the
  embeddings, modulation, norms, MLPs, the final layer) works token by token and runs on the local shard as is.
- Attention (`UlyssesAttention`) rotates the local q and k with the local `pe`, then one all-to-all of q, k and v
  gives each rank every token of H/N heads. There the padding is dropped and the sequence put in the order one
  process has (all text, then all image tokens), so the stock scaled-dot-product attention (flash on GPUs) runs
  on exactly what one process would give it for those heads. A second all-to-all sends each token's output back
  to the rank that holds the token. Padded tokens never enter attention: they change nothing.
- Every rank takes rank 0's state and conditioning at each step (broadcasts), and after the last block the
  velocity of each shard is all-gathered, so every rank runs the identical Euler update on the full latent.
- The step cache's reuse decision uses `l1_change_sums`: the sums of the relative L1 change over this rank's real
  image tokens, all-reduced, so every rank divides the same two numbers and skips the same steps.

Why Ulysses rather than ring attention for FLUX: the attention kernel stays the unchanged stock one on the full
sequence, so results match one process and every fast kernel applies; the text tokens need no special handling
(they are tokens like the image ones); each rank sends 4 (N - 1) / N x (tokens / N) x hidden per block, ring
attention 2 (N - 1) x (tokens / N) x hidden, N/2 times more (equal at 2 ranks), and ring needs its own attention
kernel to merge partial softmaxes. What Ulysses gives up: ring can hide its transfers behind compute, while each
all-to-all here is waited for (a few ms per step over NVLink, bench/sequence_parallel.py); and N must divide the
heads. FLUX's 24 split evenly over 2, 3, 4, 6, 8, 12 or 24 ranks, the sizes of multi-GPU boxes; other rank counts
(5, 7, ...) are refused with the usable ones named.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..model_loader.flux.math import apply_rope
from .denoise import Generation, GenerationSettings, StepCallback, generate
from .step_cache import l1_change_sums


def rank_count_problem(num_heads: int, ranks: int) -> str | None:
    """Why `ranks` processes cannot share a model of `num_heads` heads (None: they can)."""
    if ranks >= 1 and num_heads % ranks == 0:
        return None
    usable = ", ".join(str(n) for n in range(1, num_heads + 1) if num_heads % n == 0)
    return (f"sequence parallelism splits the transformer's {num_heads} attention heads evenly over the processes, "
            f"so it runs on {usable} processes (GPUs), not {ranks}; start torchrun with one of those "
            "--nproc-per-node values.")


@dataclass(frozen=True)
class TokenShards:
    """How N ranks split `text` + `image` tokens: each kind padded at its end to a multiple of N and cut in N equal
    chunks; rank r holds text chunk r then image chunk r (the padding sits in the last ranks' chunks)."""
    text: int
    image: int
    ranks: int

    @property
    def text_chunk(self) -> int:
        return math.ceil(self.text / self.ranks)

    @property
    def image_chunk(self) -> int:
        return math.ceil(self.image / self.ranks)

    def real_image_tokens(self, rank: int) -> int:
        """How many of rank's image chunk are real tokens (the rest is padding)."""
        return max(0, min(self.image_chunk, self.image - rank * self.image_chunk))

    def text_part(self, x: Tensor, rank: int) -> Tensor:
        """(B, text, C) -> rank's (B, text_chunk, C), zero-padded."""
        return _chunk(x, self.text_chunk, self.ranks, rank)

    def image_part(self, x: Tensor, rank: int) -> Tensor:
        """(B, image, C) -> rank's (B, image_chunk, C), zero-padded."""
        return _chunk(x, self.image_chunk, self.ranks, rank)


def _chunk(x: Tensor, chunk: int, ranks: int, rank: int) -> Tensor:
    padded = F.pad(x, (0, 0, 0, chunk * ranks - x.shape[1]))  # zeros after the last token
    return padded[:, rank * chunk:(rank + 1) * chunk]


class Collectives:
    """The collectives sequence parallelism calls, on one process group. bench/sequence_parallel.py counts what
    passes through them by overriding `_passed`."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.first = dist.get_global_rank(group, 0) if group is not None else 0

    def _passed(self, kind: str, tensor: Tensor) -> None:
        """Told of every tensor handed to a collective (nothing to do here)."""

    def all_to_all(self, x: Tensor) -> Tensor:
        """x (N, ...): part r goes to rank r; returns (N, ...) whose part r came from rank r."""
        x = x.contiguous()
        self._passed("all_to_all", x)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return out

    def all_gather(self, x: Tensor) -> Tensor:
        """x (...) of every rank -> (N, ...) in rank order, the same on every rank."""
        x = x.contiguous()
        self._passed("all_gather", x)
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))  # the concatenated form (gloo takes no other)
        # torch 2.13 renamed all_gather_into_tensor (and warns on the old name); the pack runs on torch >= 2.4.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x, group=self.group)
        return out.view(self.size, *x.shape)

    def broadcast(self, x: Tensor) -> Tensor:
        """Rank 0's x on every rank (a copy: the caller's tensor is left as it was)."""
        x = x.clone(memory_format=torch.contiguous_format)
        self._passed("broadcast", x)
        dist.broadcast(x, src=self.first, group=self.group)
        return x

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        x = x.clone()
        self._passed("all_reduce", x)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


class UlyssesAttention:
    """The attention seam's call for one rank: q, k, v (B, H, S, D) and pe (B, 1, S, D/2, 2, 2) of the rank's S
    tokens (its text chunk, then its image chunk) -> (B, S, H*D), the same as attention over the whole sequence."""

    def __init__(self, collectives: Collectives) -> None:
        self.collectives = collectives
        self.shards: TokenShards | None = None  # set by SequenceParallelFlux.embed for the step being run

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
        shards = self.shards
        if shards is None:
            raise RuntimeError("this transformer is set up for sequence parallelism: call it through its "
                               "SequenceParallelFlux (whose embed() says how the tokens are split)")
        n = self.collectives.size
        b, h, s, d = q.shape
        q, k = apply_rope(q, k, pe)  # per token: the local pe rotates the local tokens
        # (N, 3, B, H/N, S, D) in one copy: head group r goes to rank r.
        send = torch.stack([x.view(b, n, h // n, s, d).transpose(0, 1) for x in (q, k, v)], dim=1)
        del q, k, v
        received = self.collectives.all_to_all(send)  # part r: rank r's tokens of this rank's heads
        del send
        t = shards.text_chunk
        # (N, 3, B, H/N, chunk, D) -> (3, B, H/N, N*chunk, D), padding dropped: text then image, as one process.
        text = received[..., :t, :].permute(1, 2, 3, 0, 4, 5).flatten(3, 4)[..., :shards.text, :]
        image = received[..., t:, :].permute(1, 2, 3, 0, 4, 5).flatten(3, 4)[..., :shards.image, :]
        del received
        q_all, k_all, v_all = torch.cat((text, image), dim=3)
        del text, image
        out = F.scaled_dot_product_attention(q_all, k_all, v_all)  # (B, H/N, text + image, D)
        del q_all, k_all, v_all
        # Back to the token split: (B, H/N, text + image, D) -> (N, B, H/N, S, D), part r for rank r.
        text_out = F.pad(out[:, :, :shards.text], (0, 0, 0, n * t - shards.text)).unflatten(2, (n, t))
        image_out = F.pad(out[:, :, shards.text:], (0, 0, 0, n * shards.image_chunk - shards.image))
        image_out = image_out.unflatten(2, (n, shards.image_chunk))
        back = self.collectives.all_to_all(torch.cat((text_out, image_out), dim=3).permute(2, 0, 1, 3, 4))
        # part r: this rank's tokens of head group r -> (B, S, N, H/N, D) -> (B, S, H*D), heads in model order.
        return back.permute(1, 3, 0, 2, 4).reshape(b, s, h * d)


class SequenceParallelFlux(nn.Module):
    """A FluxTransformer run by the N ranks of `group` together; the same calls as the transformer's split
    forward (`embed` / `double_blocks` / `run_blocks` / `final`, and `forward_orig`), so the sampler and the step
    cache use it unchanged. embed takes the full inputs and returns this rank's shard; final gathers the full
    velocity. Constructing it installs the parallel attention in the transformer (`restore_attention` undoes it).
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None,
                 collectives: Collectives | None = None) -> None:
        super().__init__()
        self.model = model
        self.collectives = collectives if collectives is not None else Collectives(group)
        problem = rank_count_problem(model.config.num_heads, self.collectives.size)
        if problem is not None:
            raise ValueError(problem)
        self.attention = UlyssesAttention(self.collectives)
        self._previous_attention = [block.attention for block in (*model.double_blocks, *model.single_blocks)]
        model.set_attention(self.attention)

    def restore_attention(self) -> None:
        """Give the transformer's blocks back the attention they had before."""
        for block, attention in zip((*self.model.double_blocks, *self.model.single_blocks), self._previous_attention):
            block.attention = attention

    # What the sampler, the step cache, the interrupt check and GPU acceleration read of the transformer.
    @property
    def double_blocks(self) -> nn.ModuleList:
        return self.model.double_blocks

    @property
    def single_blocks(self) -> nn.ModuleList:
        return self.model.single_blocks

    @property
    def img_in(self) -> nn.Module:
        return self.model.img_in

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    def embed(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
              guidance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Full inputs (rank 0's state and conditioning count) -> this rank's img (B, image_chunk, D),
        txt (B, text_chunk, D), vec (B, D), pe (B, 1, text_chunk + image_chunk, ...)."""
        comm = self.collectives
        img, txt, y = comm.broadcast(img), comm.broadcast(txt), comm.broadcast(y)
        shards = TokenShards(txt.shape[1], img.shape[1], comm.size)
        self.attention.shards = shards
        r = comm.rank
        return self.model.embed(shards.image_part(img, r), shards.image_part(img_ids, r), shards.text_part(txt, r),
                                shards.text_part(txt_ids, r), timesteps, y, guidance)

    def run_blocks(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, first_double_block: int = 0) -> Tensor:
        return self.model.run_blocks(img, txt, vec, pe, first_double_block)

    def final(self, img: Tensor, vec: Tensor) -> Tensor:
        """This rank's image tokens (B, image_chunk, D) -> the full velocity (B, image, out_channels), every rank."""
        shards = self._shards()
        out = self.collectives.all_gather(self.model.final(img, vec))  # (N, B, image_chunk, C)
        self.attention.shards = None  # the step is over: a call that skips embed() fails instead of reusing it
        return out.permute(1, 0, 2, 3).flatten(1, 2)[:, :shards.image]

    def forward_orig(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                     guidance: Tensor | None = None) -> Tensor:
        """The transformer's reference call on full packed inputs -> the full velocity (B, image, out_channels)."""
        img, txt, vec, pe = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        return self.final(self.run_blocks(img, txt, vec, pe), vec)

    def l1_change_sums(self, current: Tensor, previous: Tensor) -> Tensor:
        """The step cache's (sum |current - previous|, sum |previous|) over all ranks' real image tokens, from
        this rank's (B, image_chunk, D) shards: one all-reduce of both sums, so every rank decides alike."""
        real = self._shards().real_image_tokens(self.collectives.rank)
        return self.collectives.all_reduce_sum(l1_change_sums(current[:, :real], previous[:, :real]))

    def _shards(self) -> TokenShards:
        if self.attention.shards is None:
            raise RuntimeError("SequenceParallelFlux: embed() runs first in every step")
        return self.attention.shards


@contextlib.contextmanager
def sequence_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> Iterator[SequenceParallelFlux]:
    """Within the block, `model` runs sequence-parallel over `group` through the yielded wrapper; afterwards its
    attention is the one it had."""
    wrapper = SequenceParallelFlux(model, group)
    try:
        yield wrapper
    finally:
        wrapper.restore_attention()


def generate_sequence_parallel(model: nn.Module, txt: Tensor, vec: Tensor, settings: GenerationSettings,
                               device: torch.device, compute_dtype: torch.dtype, group: dist.ProcessGroup | None = None,
                               init_latent: Tensor | None = None, callback: StepCallback | None = None,
                               cache_threshold: float = 0.0) -> Generation:
    """`denoise.generate` run by every rank of `group` together (each rank calls it with the same arguments; rank
    0's noise, image latent and conditioning count): the same sampling path and step cache, the latents of one
    process on every rank. For a process (a server replica, torchrun's workers) that owns one GPU per rank."""
    with sequence_parallel(model, group) as parallel:
        return generate(parallel, txt, vec, settings, device, compute_dtype, init_latent=init_latent,
                        callback=callback, cache_threshold=cache_threshold)
