"""Benchmark: LoRAs cost nothing per step once merged, and changing the set costs little against loading the base.

A reduced FLUX (default: hidden 1024, context 4096, 2 double + 4 single blocks, random bf16 weights) is written to
a temporary folder with three LoRA files (kohya names, rank --rank, on every Linear of the blocks, the embedders
and the final layer). In one run it measures, on the CPU:
  step    one transformer call (--size px, 64 text tokens) with 1 and with 3 LoRAs merged, each against the same
          call with none, alternating (best of --repeats): ratios, goal 1.00-1.02;
  change  switching the merged set (restore the previous set's layers, merge the new one: one LoRA <-> three)
          against a cold load of the base in a fresh process (its file evicted from the page cache first, the load
          then touching every weight): ratio, goal < 0.1.

    python bench/lora.py [--hidden 1024] [--double 2] [--single 4] [--rank 16] [--size 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from comfyui_krea.model_loader.flux import FluxConfig, load_flux, write_random_flux_checkpoint
from comfyui_krea.model_loader.lora import LoraChoice, set_loras
from comfyui_krea.sampling.latents import image_ids, text_ids

TOUCH_CHUNK = 1 << 22  # elements summed at a time while touching weights


def write_kohya_lora(path: Path, model: torch.nn.Module, rank: int, seed: int) -> None:
    """A LoRA on every Linear of `model`, kohya names, alpha = rank / 2."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            stem = "lora_unet_" + name.replace(".", "_")
            down = torch.randn(rank, layer.in_features, generator=gen) * 0.01
            tensors[f"{stem}.lora_down.weight"] = down.bfloat16()
            tensors[f"{stem}.lora_up.weight"] = (torch.randn(layer.out_features, rank, generator=gen) * 0.01).bfloat16()
            tensors[f"{stem}.alpha"] = torch.tensor(rank / 2)
    save_file(tensors, str(path))


def cold_load(path: Path) -> float:
    """Seconds to load the base in a fresh process and touch every weight, its file evicted from the page cache."""
    code = (
        "import os, sys, time, torch\n"
        "from comfyui_krea.model_loader.flux import load_flux\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)\n"
        "start = time.perf_counter(); model = load_flux(sys.argv[1]); total = torch.zeros((), dtype=torch.float64)\n"
        "with torch.no_grad():\n"
        "    for p in model.parameters():\n"
        f"        for chunk in p.reshape(-1).split({TOUCH_CHUNK}): total += chunk.sum(dtype=torch.float32)\n"
        "print(time.perf_counter() - start)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    config = FluxConfig(hidden_size=args.hidden, num_heads=args.hidden // 128, depth=args.double,
                        depth_single_blocks=args.single)
    with tempfile.TemporaryDirectory(prefix="krea-bench-lora-") as tmp:
        folder = Path(tmp)
        base = write_random_flux_checkpoint(folder / "base.safetensors", config, seed=0, dtype=torch.bfloat16)
        model = load_flux(base)
        loras = []
        for i in range(3):
            loras.append(folder / f"lora{i}.safetensors")
            write_kohya_lora(loras[-1], model, args.rank, seed=i)
        one, three = [LoraChoice(loras[0], 0.8)], [LoraChoice(p, s) for p, s in zip(loras, (0.8, 0.5, -0.3))]

        side = args.size // 16
        gen = torch.Generator().manual_seed(0)
        inputs = dict(img=torch.randn(1, side * side, 64, generator=gen), img_ids=image_ids(1, side * 2, side * 2),
                      txt=torch.randn(1, 64, config.context_in_dim, generator=gen), txt_ids=text_ids(1, 64),
                      timesteps=torch.tensor([0.5]), y=torch.randn(1, config.vec_in_dim, generator=gen),
                      guidance=torch.tensor([4.5]))

        def step(choice: list[LoraChoice]) -> float:
            set_loras(model, choice)
            start = time.perf_counter()
            model.forward_orig(**inputs)
            return time.perf_counter() - start

        for choice in ([], one, three):
            step(choice)  # warm-up, and the first merge of each set
        times: dict[int, list[float]] = {0: [], 1: [], 3: []}
        for _ in range(args.repeats):
            for count, choice in ((0, []), (1, one), (3, three), (0, []), (3, three), (1, one)):
                times[count].append(step(choice))
        best = {k: min(v) for k, v in times.items()}

        changes = []
        for _ in range(args.repeats):
            for choice in (one, three):
                start = time.perf_counter()
                set_loras(model, choice)
                changes.append(time.perf_counter() - start)
        change = sorted(changes)[len(changes) // 2]
        load = min(cold_load(base) for _ in range(max(2, args.repeats // 2)))
        size_gb = os.path.getsize(base) / 1e9
    print(json.dumps({"config": f"hidden {args.hidden}, {args.double}+{args.single} blocks, bf16, rank {args.rank}",
                      "step_s": best, "change_s": change, "cold_load_s": load, "file_gb": size_gb}))
    print(f"step    none {best[0] * 1e3:.1f} ms, 1 LoRA {best[1] * 1e3:.1f} ms, 3 LoRAs {best[3] * 1e3:.1f} ms: "
          f"ratios {best[1] / best[0]:.3f} and {best[3] / best[0]:.3f} (goal 1.00-1.02)")
    print(f"change  1 <-> 3 LoRAs {change * 1e3:.0f} ms (median), cold base load {load * 1e3:.0f} ms (best): "
          f"ratio {change / load:.3f} (goal < 0.1)")


if __name__ == "__main__":
    main()
