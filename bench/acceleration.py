"""Benchmark: acceleration none / regular / high, in one run, on the same weights, prompt and seed.

For each mode: transformer evaluations (steps computed fully), wall time, and the relative difference of
the final latents from `none`; printed with ratios against `none`.
  CPU default: full width (hidden 3072, context 4096), reduced depth, a small image; step caching only.
  GPU: --device cuda --full-size runs the real 12B architecture (random weights) at --size 1024, 28 steps,
  with --weight-dtype bf16 or fp8_e4m3fn (fp8 matmuls and torch.compile switch on with regular/high).
Random weights are not the trained model: how many steps a threshold saves on real weights differs.

    python bench/acceleration.py [--size 128] [--steps 12] [--double 1] [--single 2]
    python bench/acceleration.py --device cuda --full-size --size 1024 --steps 28 --weight-dtype fp8_e4m3fn
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from comfyui_krea.model_loader.flux import (
    FLUX_DEV,
    FluxConfig,
    FluxTransformer,
    RandomFluxSource,
    load_flux_from_source,
)
from comfyui_krea.sampling.denoise import GenerationSettings, generate
from comfyui_krea.sampling.gpu_acceleration import gpu_acceleration
from comfyui_krea.sampling.step_cache import THRESHOLDS


def build_model(args: argparse.Namespace, device: torch.device) -> FluxTransformer:
    config = FLUX_DEV if args.full_size else FluxConfig(depth=args.double, depth_single_blocks=args.single)
    # bf16 random weights made on the device and converted by the real loader (load_flux reads files the
    # same way; writing the 23.8 GB file first would cost minutes of GPU time).
    source = RandomFluxSource(config, seed=0, dtype=torch.bfloat16, device=device)
    model = load_flux_from_source(source, weight_dtype=args.weight_dtype, device=device, name="random weights")
    if args.damp_time != 1.0:
        # A model whose output changes little from step to step, as a trained one does between close steps
        # (random weights otherwise make every step look new to the cache).
        with torch.no_grad():
            for p in model.time_in.parameters():
                p.mul_(args.damp_time)
    return model


def run(model: FluxTransformer, mode: str, settings: GenerationSettings, device: torch.device,
        txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, int, float, list[str]]:
    threshold = THRESHOLDS[mode]
    with contextlib.ExitStack() as stack:
        extras = stack.enter_context(gpu_acceleration(model, device)) if threshold > 0 else []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = generate(model, txt, vec, settings, device, model.compute_dtype, cache_threshold=threshold)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    full = result.cache.full_steps if result.cache is not None else result.steps
    return result.latents, full, seconds, extras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--txt", type=int, default=128, help="text tokens (FLUX uses 512)")
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--full-size", action="store_true", help="the real FLUX.1 architecture (GPU)")
    parser.add_argument("--weight-dtype", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--damp-time", type=float, default=1.0,
                        help="scale the timestep embedder's weights (e.g. 0.1: steps change little)")
    parser.add_argument("--warmup", action="store_true", help="one untimed run per mode first (torch.compile)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    txt, vec = torch.randn(1, args.txt, 4096, generator=gen), torch.randn(1, 768, generator=gen)
    settings = GenerationSettings(width=args.size, height=args.size, num_steps=args.steps, guidance=4.5, seed=0,
                                  num_images=1)
    with torch.inference_mode():
        model = build_model(args, device)
        results = {}
        for mode in THRESHOLDS:
            if args.warmup:
                run(model, mode, settings, device, txt, vec)
            results[mode] = run(model, mode, settings, device, txt, vec)
    base_latents, base_full, base_seconds, _ = results["none"]
    print(f"{'full size' if args.full_size else f'hidden 3072, {args.double}+{args.single} blocks'}, "
          f"{args.size}x{args.size}, {args.steps} steps, weights {args.weight_dtype}, {device}, "
          f"time embedding x{args.damp_time}")
    print(f"{'mode':8} {'evals':>6} {'evals/none':>10} {'time s':>8} {'time/none':>9} {'latent diff':>11}  extras")
    for mode, (latents, full, seconds, extras) in results.items():
        diff = ((latents - base_latents).norm() / base_latents.norm()).item()
        print(f"{mode:8} {full:6d} {full / base_full:10.2f} {seconds:8.2f} {seconds / base_seconds:9.2f} "
              f"{diff:11.2e}  {', '.join(extras) or '-'}")


if __name__ == "__main__":
    main()
