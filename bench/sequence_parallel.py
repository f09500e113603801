"""Benchmark: what sequence parallelism (sampling/sequence_parallel.py, Ulysses all-to-all over heads) moves between
ranks per step, measured against its formula, and the speedup on GPUs those figures let one expect.

1. Measured (CPU, gloo): N real processes sample a reduced FLUX (random weights, 12 heads, 2 double + 3 single
   blocks, token counts N does not divide) with step caching; every tensor handed to a collective is counted, per
   step and per rank, and compared with the formula for that model (they must be equal), and the latents with
   those of one process.
2. Computed: the formula for the 12B model (19 + 38 blocks, hidden 3072, 24 heads, bf16) at 1024x1024 with 512
   text tokens, for 2 to 8 ranks: bytes per step per rank handed to collectives and sent over the links, and the
   expected time per step from an assumed compute rate and link bandwidth (no overlap of communication with
   compute: Ulysses waits for each all-to-all). The speedup itself needs GPUs; nothing here measured one.

    python bench/sequence_parallel.py [--ranks 2 4] [--steps 8]
    python bench/sequence_parallel.py --tflops 400 --link "NVLink:300:25" --link "PCIe 4.0:20:50"
"""
from __future__ import annotations

import argparse
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from comfyui_krea.model_loader.flux import FLUX_DEV, FluxConfig, FluxTransformer
from comfyui_krea.model_loader.flux.random_weights import random_flux_tensor
from comfyui_krea.sampling.denoise import GenerationSettings, generate
from comfyui_krea.sampling.sequence_parallel import Collectives, SequenceParallelFlux
from comfyui_krea.sampling.step_cache import THRESHOLDS

REDUCED = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=96, num_heads=12,
                     depth=2, depth_single_blocks=3, axes_dim=(2, 2, 4))
TEXT_TOKENS = 7
SETTINGS = GenerationSettings(width=80, height=112, num_steps=8, guidance=3.5, seed=9, num_images=1)  # 35 tokens


# ------------------------------------------------------------------------------------------------ the formula

@dataclass(frozen=True)
class Step:
    """Bytes each rank hands to each collective in one step (what `Collectives` is given)."""
    all_to_all: int
    all_gather: int
    broadcast: int
    all_reduce: int

    @property
    def total(self) -> int:
        return self.all_to_all + self.all_gather + self.broadcast + self.all_reduce

    def link_bytes(self, ranks: int) -> float:
        """What leaves each rank over the links: an all-to-all keeps 1/N; a ring all-gather sends the shard to
        N-1 ranks; a pipelined broadcast forwards the tensor once; a ring all-reduce sends 2(N-1)/N of it."""
        return ((ranks - 1) / ranks * self.all_to_all + (ranks - 1) * self.all_gather + self.broadcast
                + 2 * (ranks - 1) / ranks * self.all_reduce)


def step_bytes(config: FluxConfig, image: int, text: int, ranks: int, batch: int = 1, element: int = 2,
               full: bool = True, cache_check: bool = False) -> Step:
    """The formula. A full step runs every block (one attention, two all-to-alls each); a reused step only the
    first; `cache_check`: the step cache compares residuals (two float64 sums all-reduced)."""
    text_chunk, image_chunk = math.ceil(text / ranks), math.ceil(image / ranks)
    attention_calls = config.depth + config.depth_single_blocks if full else 1
    # q, k, v out and the attention output back: 4 x (local tokens) x hidden per call.
    all_to_all = attention_calls * 4 * batch * (text_chunk + image_chunk) * config.hidden_size * element
    all_gather = batch * image_chunk * config.out_channels * element  # this rank's velocity
    broadcast = batch * (image * config.in_channels + text * config.context_in_dim + config.vec_in_dim) * element
    return Step(all_to_all, all_gather, broadcast, 2 * 8 if cache_check else 0)


def step_flops(config: FluxConfig, image: int, text: int, batch: int = 1) -> float:
    """One full step's multiply-adds x 2: every token meets 4 h^2 + 2 h m weights in every block (double: qkv,
    proj, MLP per stream; single: linear1 and linear2), attention 4 S^2 h per block; embeddings are per image."""
    h, m, s = config.hidden_size, config.mlp_hidden_dim, text + image
    blocks = config.depth + config.depth_single_blocks
    return batch * blocks * (2 * s * (4 * h * h + 2 * h * m) + 4 * s * s * h)


# ------------------------------------------------------------------------------------------------ measurement

class CountingCollectives(Collectives):
    def __init__(self, group=None) -> None:
        super().__init__(group)
        self.steps: list[Counter] = []

    def _passed(self, kind: str, tensor: torch.Tensor) -> None:
        self.steps[-1][kind] += tensor.numel() * tensor.element_size()


class CountedFlux(SequenceParallelFlux):
    def embed(self, *args, **kwargs):
        self.collectives.steps.append(Counter())  # embed opens every step
        return super().embed(*args, **kwargs)


def reduced_model() -> FluxTransformer:
    model = FluxTransformer(REDUCED).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            tensor.copy_(random_flux_tensor(key, tuple(tensor.shape), seed=1))
        for p in model.time_in.parameters():  # steps change little, as in a trained model: the cache reuses some
            p.mul_(0.1)
    return model


def conditioning() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, TEXT_TOKENS, REDUCED.context_in_dim, generator=gen), torch.randn(1, REDUCED.vec_in_dim,
                                                                                         generator=gen)


def worker(rank: int, ranks: int, folder: str, settings: GenerationSettings) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=ranks)
    try:
        model = reduced_model()
        parallel = CountedFlux(model, collectives=CountingCollectives())
        txt, vec = conditioning()
        with torch.no_grad():
            result = generate(parallel, txt, vec, settings, torch.device("cpu"), torch.float32,
                              cache_threshold=THRESHOLDS["high"])
        parallel.restore_attention()
        torch.save({"latents": result.latents, "steps": parallel.collectives.steps,
                    "reused_at": result.cache.reused_at}, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def measure(ranks: int, settings: GenerationSettings) -> None:
    model = reduced_model()
    txt, vec = conditioning()
    with torch.no_grad():
        single = generate(model, txt, vec, settings, torch.device("cpu"), torch.float32,
                          cache_threshold=THRESHOLDS["high"]).latents
    with tempfile.TemporaryDirectory(prefix="krea-sp-bench-") as folder:
        mp.spawn(worker, args=(ranks, folder, settings), nprocs=ranks, join=True)
        runs = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(ranks)]
    image = (settings.width // 16) * (settings.height // 16)
    steps = runs[0]["steps"]
    assert all(run["steps"] == steps for run in runs), "every rank hands the same bytes to the collectives"
    last = len(steps) - 1
    print(f"\n{ranks} ranks: reduced model ({REDUCED.depth}+{REDUCED.depth_single_blocks} blocks, hidden "
          f"{REDUCED.hidden_size}, {REDUCED.num_heads} heads), {settings.width}x{settings.height} = {image} image + "
          f"{TEXT_TOKENS} text tokens, float32, {len(steps)} steps, reused {runs[0]['reused_at']}")
    mismatches, measured_total, formula_total = 0, 0, 0
    for i, counted in enumerate(steps):
        full = i not in runs[0]["reused_at"]
        formula = step_bytes(REDUCED, image, TEXT_TOKENS, ranks, element=4, full=full, cache_check=0 < i < last)
        expected = Counter({k: v for k, v in vars(formula).items() if v})
        mismatches += counted != expected
        measured_total, formula_total = measured_total + sum(counted.values()), formula_total + formula.total
        print(f"  step {i} ({'full' if full else 'reused'}): measured {sum(counted.values()):>8,} B "
              f"({', '.join(f'{k} {v:,}' for k, v in sorted(counted.items()))}); formula {formula.total:>8,} B")
    relative = ((runs[0]["latents"] - single).norm() / single.norm()).item()
    print(f"  whole run: measured {measured_total:,} B / formula {formula_total:,} B = "
          f"{measured_total / formula_total:.3f}; steps that differ: {mismatches}; latents vs one process: rel "
          f"{relative:.1e}")


# ------------------------------------------------------------------------------------------------ estimate

def estimate(args: argparse.Namespace) -> None:
    image, text = (args.size // 16) ** 2, 512
    flops = step_flops(FLUX_DEV, image, text)
    one = flops / (args.tflops * 1e12)
    print(f"\nFLUX.1 12B at {args.size}x{args.size} ({image} image + {text} text tokens, bf16), one full step: "
          f"{flops / 1e12:.1f} TFLOP -> {one * 1e3:.0f} ms on one GPU at an assumed {args.tflops:.0f} TFLOP/s")
    links = [link.split(":") for link in args.link]
    print("ranks | handed to collectives / step / rank | sent over links | " +
          " | ".join(f"{name}: ms/step (comm), speedup" for name, _, _ in links))
    for ranks in args.estimate_ranks:
        step = step_bytes(FLUX_DEV, image, text, ranks)
        sent = step.link_bytes(ranks)
        padded = ranks * (math.ceil(image / ranks) + math.ceil(text / ranks))
        compute = step_flops(FLUX_DEV, padded - text, text) / ranks / (args.tflops * 1e12)
        collectives = 2 * (FLUX_DEV.depth + FLUX_DEV.depth_single_blocks) + 4
        cells = []
        for _name, bandwidth, latency in links:
            comm = sent / (float(bandwidth) * 1e9) + collectives * float(latency) * 1e-6
            cells.append(f"{(compute + comm) * 1e3:.1f} ({comm * 1e3:.1f}), {one / (compute + comm):.2f}x")
        print(f"{ranks:>5} | {step.total / 2**20:>10.1f} MiB "
              f"(all-to-all {step.all_to_all / 2**20:.1f}) | {sent / 2**20:>9.1f} MiB | " + " | ".join(cells))
    print("Assumed: the compute rate holds for each rank's 1/N share (smaller matrices run less efficiently, so "
          "real speedups are lower), no overlap of communication and compute, link figures are per GPU per "
          "direction as NCCL achieves them (name:GB/s:latency us per collective). Measure the real one on GPUs: "
          "the s/step of `torchrun --nproc-per-node N -m comfyui_krea run ...` against one process.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="*", default=[2, 4], help="measured on the CPU (gloo)")
    parser.add_argument("--steps", type=int, default=SETTINGS.num_steps)
    parser.add_argument("--estimate-ranks", type=int, nargs="*", default=[2, 3, 4, 6, 8])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tflops", type=float, default=400.0, help="effective bf16 rate of one GPU (H100: ~400)")
    parser.add_argument("--link", action="append", default=None,
                        help="name:GB/s:latency-us, e.g. 'NVLink:300:25' (default: NVLink and PCIe 4.0)")
    args = parser.parse_args()
    args.link = args.link or ["NVLink (H100 SXM):300:25", "PCIe 4.0 x16:20:50"]
    settings = GenerationSettings(**{**vars(SETTINGS), "num_steps": args.steps})
    for ranks in args.ranks:
        measure(ranks, settings)
    estimate(args)


if __name__ == "__main__":
    main()
