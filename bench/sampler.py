"""Benchmark: our transformer step against diffusers' FluxTransformer2DModel, and the sampler's overhead.

Same full-width, reduced-depth weights (hidden 3072, context 4096, vec 768; --double / --single blocks,
random), same tokens, same dtype, in one run:
  step   time of one transformer call, ours vs diffusers (median of --repeats), printed as a ratio
         (target: at most 1.0);
  share  a whole 20-step `generate` run (noise, schedule, packing, the Euler loop, unpacking) against the
         time spent inside the transformer calls: the share outside the transformer (target: under 5%).
Needs the test extras (diffusers). On the CPU keep sizes small; on a GPU pass --device cuda --dtype bf16.

    python bench/sampler.py [--size 256] [--txt 256] [--double 1] [--single 1] [--device cpu] [--dtype fp32]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from comfyui_krea.model_loader.flux import FluxConfig, load_flux, write_random_flux_checkpoint
from comfyui_krea.sampling.denoise import GenerationSettings, generate
from comfyui_krea.sampling.latents import image_ids, text_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_pair(first, second, device: torch.device, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of two calls (the least disturbed run of each), measured alternately and in
    alternating order so that drifts in machine load hit both equally."""
    first(), second()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for round_index in range(repeats):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for which in order:
            fn = (first, second)[which]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[which].append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


class TimedModel(torch.nn.Module):
    """The transformer, with the wall time of every call added up."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model, self.device, self.seconds = model, device, 0.0

    def forward(self, **kwargs) -> torch.Tensor:
        sync(self.device)
        start = time.perf_counter()
        out = self.model(**kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--txt", type=int, default=256, help="text tokens (FLUX uses 512)")
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)

    config = FluxConfig(depth=args.double, depth_single_blocks=args.single)
    with tempfile.TemporaryDirectory() as folder:
        ours = load_flux(write_random_flux_checkpoint(Path(folder) / "bfl.safetensors", config, seed=0,
                                                      dtype=dtype), device=device)
        diffusers_file = write_random_flux_checkpoint(Path(folder) / "d.safetensors", config, seed=0, dtype=dtype,
                                                      layout="diffusers")
        theirs = FluxTransformer2DModel(
            num_layers=args.double, num_single_layers=args.single, guidance_embeds=True).eval()
        theirs.load_state_dict(load_file(diffusers_file), strict=True)
        theirs.to(device, dtype)

    lh = lw = args.size // 8
    tokens = (lh // 2) * (lw // 2)
    img = torch.randn(1, tokens, 64, device=device, dtype=dtype)
    txt = torch.randn(1, args.txt, 4096, device=device, dtype=dtype)
    vec = torch.randn(1, 768, device=device, dtype=dtype)
    t = torch.full((1,), 0.7, device=device, dtype=dtype)
    g = torch.full((1,), 4.5, device=device, dtype=dtype)
    ids, tids = image_ids(1, lh, lw).to(device), text_ids(1, args.txt).to(device)

    with torch.inference_mode():
        ours_out = ours.forward_orig(img=img, img_ids=ids, txt=txt, txt_ids=tids, timesteps=t, y=vec, guidance=g)
        theirs_out = theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                            img_ids=ids[0], txt_ids=tids[0], guidance=g, return_dict=False)[0]
        diff = ((ours_out.float() - theirs_out.float()).norm() / theirs_out.float().norm()).item()
        ours_s, theirs_s = timed_pair(
            lambda: ours.forward_orig(img=img, img_ids=ids, txt=txt, txt_ids=tids, timesteps=t, y=vec, guidance=g),
            lambda: theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                           img_ids=ids[0], txt_ids=tids[0], guidance=g, return_dict=False),
            device, args.repeats)

        wrapped = TimedModel(ours, device)
        settings = GenerationSettings(width=args.size, height=args.size, num_steps=args.steps, guidance=4.5, seed=0,
                                      num_images=1)
        sync(device)
        start = time.perf_counter()
        generate(wrapped, txt.float().cpu(), vec.float().cpu(), settings, device, dtype)
        sync(device)
        total = time.perf_counter() - start

    print(f"model: hidden 3072, {args.double} double + {args.single} single blocks, {tokens} image + {args.txt} "
          f"text tokens, {args.dtype} on {device}")
    print(f"outputs agree: relative difference {diff:.2e}")
    print(f"step time: ours {ours_s * 1000:.1f} ms, diffusers {theirs_s * 1000:.1f} ms, "
          f"ratio ours/diffusers {ours_s / theirs_s:.3f} (target <= 1.0: {'met' if ours_s <= theirs_s else 'NOT met'})")
    outside = (total - wrapped.seconds) / total
    print(f"{args.steps}-step run: {total:.2f} s, {wrapped.seconds:.2f} s in the transformer, "
          f"{outside * 100:.2f}% outside it (target < 5%: {'met' if outside < 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
