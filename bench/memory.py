"""Benchmark: the pack's MODEL under ComfyUI's memory management, and its sampler against ComfyUI's own.

In one run, inside the real ComfyUI (COMFYUI_DIR, see ../shared/comfyui/setup.sh), on random weights of the
full width (hidden 3072, so ComfyUI's own FLUX loader reads the file too) and reduced depth:
  resident  weight bytes ComfyUI keeps on the device against the budget it was given (partial loading);
  stream    time of one transformer call with the weights streamed layer by layer against fully resident
            (on the CPU streaming costs casts only; on a GPU it costs the host-to-device copies);
  native    a KreaSampler step on the pack's MODEL against a native KSampler step on ComfyUI's own FLUX
            loaded from the same file (same size, one model call per step each), as a ratio (target <= 1.0).

    COMFYUI_DIR=... python bench/memory.py [--double 1] [--single 1] [--size 256] [--budget 0.4] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.environ["COMFYUI_DIR"])
from comfy.cli_args import args as comfy_args  # noqa: E402  (set before ComfyUI's model management loads)

comfy_args.cpu = "--device" not in sys.argv or sys.argv[sys.argv.index("--device") + 1] == "cpu"

import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402
import torch  # noqa: E402

from comfyui_krea.model_loader.flux import FluxConfig, write_random_flux_checkpoint  # noqa: E402
from comfyui_krea.nodes.host.comfyui_models import transformer_model  # noqa: E402
from comfyui_krea.nodes.sampler import KreaSampler  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--tokens", type=int, default=64, help="text tokens")
    parser.add_argument("--budget", type=float, default=0.4, help="weight budget as a share of the model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()
    config = FluxConfig(depth=opts.double, depth_single_blocks=opts.single)
    work = Path(tempfile.mkdtemp(prefix="krea-memory-"))
    folder_paths.add_model_folder_path("diffusion_models", str(work), is_default=True)
    write_random_flux_checkpoint(work / "flux.safetensors", config, seed=0, dtype=torch.bfloat16)
    device = mm.get_torch_device()

    model = transformer_model(work / "flux.safetensors", "default")
    transformer = model.model.diffusion_model
    lh = lw = opts.size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, lh, lw, generator=gen).to(device, transformer.compute_dtype)
    context = torch.randn(1, opts.tokens, 4096, generator=gen).to(device, transformer.compute_dtype)
    inputs = (x, torch.tensor([0.5], device=device), context)
    extra = {"y": torch.randn(1, 768, generator=gen).to(device, transformer.compute_dtype),
             "guidance": torch.tensor([4.5], device=device)}

    def step() -> None:
        with torch.no_grad():
            transformer(*inputs, **extra)

    model.patch_model(device_to=device)
    resident_time = best_of(step, opts.repeats)
    model.unpatch_model(device_to=model.offload_device)
    budget = int(model.model_size() * opts.budget)
    model.patch_model(device_to=device, lowvram_model_memory=budget)
    loaded = model.loaded_size()
    streamed_time = best_of(step, opts.repeats)
    model.unpatch_model(device_to=model.offload_device)

    native = comfy_nodes.UNETLoader().load_unet("flux.safetensors", "default")[0]
    cond = [[torch.randn(1, opts.tokens, 4096, generator=gen),
             {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 4.5}]]
    latent = {"samples": torch.zeros(1, 16, lh, lw)}
    steps = 2

    def ours() -> None:
        KreaSampler().sample(model, cond, "custom", opts.size, opts.size, steps, 4.5, 1, 1, "none")

    def theirs() -> None:
        comfy_nodes.common_ksampler(native, 1, steps, 1.0, "euler", "simple", cond, cond, latent)

    ours_time, theirs_time = best_of(ours, opts.repeats), best_of(theirs, opts.repeats)
    print(f"model: full width, {opts.double}+{opts.single} blocks, bf16, {model.model_size() / 2**30:.2f} GiB; "
          f"{opts.size}x{opts.size}, {opts.tokens} text tokens, on {device}")
    print(f"resident  {loaded / 2**30:.3f} GiB loaded for a budget of {budget / 2**30:.3f} GiB: "
          f"ratio {loaded / budget:.3f} (<= 1)")
    print(f"stream    one call streamed {streamed_time * 1000:.0f} ms, resident {resident_time * 1000:.0f} ms: "
          f"ratio {streamed_time / resident_time:.3f}")
    print(f"native    {steps} steps: KreaSampler {ours_time:.3f} s, native KSampler {theirs_time:.3f} s: "
          f"ratio {ours_time / theirs_time:.3f}")


if __name__ == "__main__":
    main()
