"""Benchmark: the cost of two LoRAs on a Q8_0 GGUF transformer, as step time with the LoRAs over step time without,
for the pack and for ComfyUI-GGUF in the same run, on the same file and LoRA files.

The file: FLUX's full width (hidden 3072, context 4096) at reduced depth (--double / --single blocks) as ComfyUI-GGUF
lays out a Q8_0 file (random valid blocks). The LoRAs: two kohya-named files (ranks 16 and 32) on every Linear of
every block, the shape of the LoRAs users stack. One "step" is one call of the transformer on a latent of
--latent x --latent (tokens: (latent/2)^2 image + 256 text), batch 1, float32 on the CPU, one thread; best of
--repeats of the CPU time each call takes (process time: steady on a shared machine).

  pack                 load_flux + set_loras (outside ComfyUI): low-rank factors beside each dequantized matmul
  comfyui-gguf         UnetLoaderGGUF + LoraLoaderModelOnly x2 inside ComfyUI ($COMFYUI_DIR, with ComfyUI-GGUF in its
                       custom_nodes): each call dequantizes the weight and applies the LoRA patches to it
  pack-in-comfyui      the Krea Model Loader's MODEL + LoraLoaderModelOnly x2 inside ComfyUI

Goal for the pack: <= 1.10 (users report 1.31 with ComfyUI-GGUF: 4.30 -> 5.65 s/it on a GPU at 1024x1024).

    COMFYUI_DIR=... python bench/gguf_lora.py [--repeats 3] [--double 1] [--single 1] [--latent 32]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where bench/gguf.py would shadow the gguf package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

log = logging.getLogger("bench.gguf_lora")
TEXT_TOKENS = 256
RANKS = (16, 32)
GOAL = 1.10


def write_loras(folder: Path, double: int, single: int) -> list[str]:
    """Two kohya-named LoRA files on every block Linear of FLUX's full width; their names."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from comfyui_krea.model_loader.flux import FLUX_DEV
    from comfyui_krea.model_loader.lora import linear_shapes

    config = dataclasses.replace(FLUX_DEV, depth=double, depth_single_blocks=single)
    layers = {n: s for n, s in linear_shapes(config).items() if n.startswith(("double_blocks.", "single_blocks."))}
    gen = torch.Generator().manual_seed(0)
    names = []
    for rank in RANKS:
        tensors = {}
        for layer, (out_features, in_features) in layers.items():
            stem = "lora_unet_" + layer.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.01
            tensors[f"{stem}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.01
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
        name = f"rank{rank}.safetensors"
        save_file({k: v.to(torch.bfloat16) if v.ndim else v for k, v in tensors.items()}, str(folder / name))
        names.append(name)
    return names


def inputs(latent: int):
    """ComfyUI's call of a FLUX diffusion_model: x (1, 16, latent, latent), timestep, context, y, guidance."""
    import torch

    gen = torch.Generator().manual_seed(1)
    return ((torch.randn(1, 16, latent, latent, generator=gen), torch.tensor([0.6]),
             torch.randn(1, TEXT_TOKENS, 4096, generator=gen)),
            {"y": torch.randn(1, 768, generator=gen), "guidance": torch.tensor([3.5])})


def step_seconds(module, latent: int, repeats: int) -> float:
    """Best CPU time of one call (after one warm-up call)."""
    import torch

    args, kwargs = inputs(latent)
    best = float("inf")
    with torch.no_grad():
        module(*args, **kwargs)
        for _ in range(repeats):
            start = time.process_time()
            module(*args, **kwargs)
            best = min(best, time.process_time() - start)
    return best


def child_pack(folder: Path, latent: int, repeats: int) -> dict:
    from comfyui_krea.model_loader.flux import load_flux
    from comfyui_krea.model_loader.lora import LoraChoice, set_loras

    model = load_flux(folder / "diffusion_models" / "flux-Q8_0.gguf")
    none = step_seconds(model, latent, repeats)
    set_loras(model, [LoraChoice(folder / "loras" / f"rank{r}.safetensors", 1.0) for r in RANKS])
    return {"none": none, "loras": step_seconds(model, latent, repeats)}


def child_comfyui(folder: Path, latent: int, repeats: int) -> dict:
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management as mm
    import folder_paths
    import nodes as comfy_nodes

    for kind in ("diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, str(folder / kind), is_default=True)
    sys.path.insert(0, str(Path(os.environ["COMFYUI_DIR"]) / "custom_nodes"))
    theirs = importlib.import_module("ComfyUI-GGUF").NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]()
    from comfyui_krea.nodes.host import ModelSlot, host

    makers = {"comfyui-gguf": lambda: theirs.load_unet("flux-Q8_0.gguf")[0],
              "pack-in-comfyui": lambda: host.transformer_model(folder / "diffusion_models" / "flux-Q8_0.gguf",
                                                                "default", host.torch_device(), ModelSlot())}
    loader = comfy_nodes.LoraLoaderModelOnly()
    result = {}
    for name, make in makers.items():
        base = make()
        patched = base
        for rank in RANKS:
            patched = loader.load_lora_model_only(patched, f"rank{rank}.safetensors", 1.0)[0]
        times = {}
        for label, model in (("none", base), ("loras", patched)):
            mm.load_models_gpu([model])
            times[label] = step_seconds(model.model.diffusion_model, latent, repeats)
            mm.unload_all_models()
        result[name] = times
        del base, patched
    return result


def run_child(mode: str, folder: Path, latent: int, repeats: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), "--latent", str(latent),
                           "--repeats", str(repeats)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (default 1)")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks (default 1)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: 256 image tokens, 256x256 px)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(1)
        mode, folder = args.child[0], Path(args.child[1])
        found = child_pack(folder, args.latent, args.repeats) if mode == "pack" else \
            child_comfyui(folder, args.latent, args.repeats)
        sys.stdout.write(json.dumps(found) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = importlib.util.spec_from_file_location("bench_gguf", Path(__file__).with_name("gguf.py"))
    bench_gguf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gguf)
    folder = Path(tempfile.mkdtemp(prefix="krea_bench_gguf_lora_"))
    try:
        for kind in ("diffusion_models", "loras"):
            (folder / kind).mkdir()
        bench_gguf.write_q4_k(folder / "diffusion_models" / "flux-Q8_0.gguf", args.double, args.single, "Q8_0",
                              scale=0.0002)
        write_loras(folder / "loras", args.double, args.single)
        log.info("Q8_0 file: %.2f GB (%d double + %d single blocks, hidden 3072); LoRAs of rank %s on every block "
                 "Linear; %d image + %d text tokens; one thread, CPU time, best of %d",
                 (folder / "diffusion_models" / "flux-Q8_0.gguf").stat().st_size / 1e9, args.double, args.single,
                 " and ".join(map(str, RANKS)), (args.latent // 2) ** 2, TEXT_TOKENS, args.repeats)
        results = {"pack": run_child("pack", folder, args.latent, args.repeats)}
        if os.environ.get("COMFYUI_DIR"):
            results.update(run_child("comfyui", folder, args.latent, args.repeats))
        else:
            log.info("COMFYUI_DIR not set: ComfyUI-GGUF's rows are left out")
        log.info("%-16s %12s %12s %8s", "", "no LoRA s", "2 LoRAs s", "ratio")
        for name, t in results.items():
            log.info("%-16s %12.3f %12.3f %8.3f", name, t["none"], t["loras"], t["loras"] / t["none"])
        ratio = results["pack"]["loras"] / results["pack"]["none"]
        log.info("pack goal <= %.2f: %s", GOAL, "PASS" if ratio <= GOAL else "FAIL")
        return 0 if ratio <= GOAL else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
