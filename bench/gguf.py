"""Benchmark: GGUF dequantization throughput per type, and the memory of loading a Q4_K FLUX file.

dequant  for each block type, one 3072 x 3072 weight of random valid blocks dequantized to float32 by
         - the pack (model_loader/gguf/dequantize.py, torch),
         - the `gguf` package's numpy reference (gguf.quants.dequantize),
         - ComfyUI-GGUF's torch dequantization (its dequant.py, imported from a ComfyUI-GGUF folder: --comfyui-gguf,
           else $COMFYUI_DIR/custom_nodes/ComfyUI-GGUF), the way its UnetLoaderGGUF calls it by default
           (dequant_dtype None: float16 arithmetic, then float32) and with dequant_dtype float32;
         same bytes, same run, one thread each (numpy's reference is single-threaded), best of --repeats of the
         CPU time each takes (process time: steady on a shared machine, where wall time is not; wall time is
         printed too); ratios reference / pack (> 1: the pack is faster). Targets: >> 1 over numpy, >= 1 over
         ComfyUI-GGUF.
memory   a full-width, reduced-depth FLUX transformer (hidden 3072, context 4096; --double / --single blocks) as a
         Q4_K GGUF file in ComfyUI-GGUF's layout (random valid blocks), loaded by `load_flux` in a fresh process
         that then touches every weight's bytes; peak RSS above the process's baseline / the file's size.
         Target <= 1.1 (the weights stay in the file's memory map, quantized). Also reported: the peak of one
         forward pass (64 image + 16 text tokens), which adds the largest layer dequantized for its call.

    python bench/gguf.py [--repeats 3] [--double 2] [--single 2] [--comfyui-gguf PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, where this file would shadow the gguf package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

log = logging.getLogger("bench.gguf")

RSS_TARGET = 1.1
SIDE = 3072  # the weight dequantized per type: FLUX's hidden size squared (an attention projection)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def comfyui_gguf_dequant(folder: Path | None):
    """ComfyUI-GGUF's dequant module (it imports only gguf, torch and tqdm), or None when not found."""
    if folder is None and os.environ.get("COMFYUI_DIR"):
        folder = Path(os.environ["COMFYUI_DIR"]) / "custom_nodes" / "ComfyUI-GGUF"
    if folder is None or not (folder / "dequant.py").is_file():
        return None
    spec = importlib.util.spec_from_file_location("comfyui_gguf_dequant", folder / "dequant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WALL: dict[str, float] = {}  # the last measurement's best wall time, for the log


def best_time(repeats: int, fn, *args, **kwargs) -> float:
    """The least CPU time of `repeats` calls (after a warm-up call); the least wall time goes to WALL."""
    fn(*args, **kwargs)  # warm-up (allocator, caches)
    cpu, wall = [], []
    for _ in range(repeats):
        start, start_wall = time.process_time(), time.perf_counter()
        fn(*args, **kwargs)
        cpu.append(time.process_time() - start)
        wall.append(time.perf_counter() - start_wall)
    WALL["last"] = min(wall)
    return min(cpu)


def dequant_bench(repeats: int, folder: Path | None) -> None:
    import gguf
    import numpy as np
    import torch

    from comfyui_krea.model_loader.gguf import QUANT_TYPES, dequantize
    from comfyui_krea.model_loader.gguf.encode import random_blocks

    theirs = comfyui_gguf_dequant(folder)
    if theirs is None:
        log.info("ComfyUI-GGUF not found (--comfyui-gguf or COMFYUI_DIR): its column is left out")
    torch.set_num_threads(1)
    log.info("dequantize one %dx%d weight to float32, one thread, CPU ms (best of %d); pack wall ms in brackets",
             SIDE, SIDE, repeats)
    log.info("%-5s %16s %9s %9s %9s | %7s %10s %12s", "type", "pack ms", "numpy ms", "cg16 ms", "cg32 ms",
             "numpy/", "ComfyGGUF/", "ComfyGGUF32/")
    for name, qtype in QUANT_TYPES.items():
        if not qtype.quantized:
            continue
        rng = np.random.default_rng(0)
        blocks = random_blocks(qtype, SIDE * SIDE // qtype.block_size, rng).reshape(SIDE, qtype.row_bytes(SIDE))
        raw = torch.from_numpy(blocks)
        ggml = gguf.GGMLQuantizationType[name]
        ours = best_time(repeats, dequantize, raw, qtype, (SIDE, SIDE))
        ours_wall = WALL["last"]
        numpy_s = best_time(repeats, gguf.quants.dequantize, blocks, ggml)
        cg16 = cg32 = float("nan")
        if theirs is not None:  # its default (float16 arithmetic, as UnetLoaderGGUF calls it), then float32
            cg16 = best_time(repeats, lambda *a: theirs.dequantize(*a, dtype=None).to(torch.float32),
                             raw, ggml, (SIDE, SIDE))
            cg32 = best_time(repeats, theirs.dequantize, raw, ggml, (SIDE, SIDE), dtype=torch.float32)
        log.info("%-5s %6.1f (%7.1f) %9.1f %9.1f %9.1f | %7.1f %10.2f %12.2f", name, ours * 1e3, ours_wall * 1e3,
                 numpy_s * 1e3, cg16 * 1e3, cg32 * 1e3, numpy_s / ours, cg16 / ours, cg32 / ours)


def child(mode: str, path: str) -> None:
    """Runs in a subprocess: one measurement, a JSON line on stdout."""
    import torch

    if mode == "write":
        write_q4_k(Path(path), *(int(n) for n in os.environ["KREA_BENCH_DEPTHS"].split(",")))
        return
    from comfyui_krea.model_loader.flux import load_flux

    baseline = _peak_rss_bytes()
    start = time.perf_counter()
    model = load_flux(path)
    result = {"load_s": time.perf_counter() - start}
    total = torch.zeros((), dtype=torch.float64)
    for t in model.state_dict().values():  # every weight's stored bytes (blocks stay blocks)
        for chunk in t.reshape(-1).view(torch.uint8).split(1 << 20):  # sum's int64 copy stays 8 MB
            total += chunk.sum(dtype=torch.int64)
    result["touched_s"] = time.perf_counter() - start
    result["peak_after_touch"] = _peak_rss_bytes() - baseline
    if mode == "forward":
        c = model.config
        ids = torch.zeros(1, 64, 3)
        with torch.no_grad():
            model.forward_orig(torch.randn(1, 64, c.in_channels), ids, torch.randn(1, 16, c.context_in_dim),
                               torch.zeros(1, 16, 3), torch.full((1,), 0.5), torch.randn(1, c.vec_in_dim),
                               torch.full((1,), 3.5))
        result["peak_after_forward"] = _peak_rss_bytes() - baseline
    sys.stdout.write(json.dumps(result) + "\n")


def write_q4_k(path: Path, double: int, single: int, type_name_of_file: str = "Q4_K", scale: float = 0.01) -> None:
    """FLUX's full width, reduced depth, as ComfyUI-GGUF lays out a Q4_K (or `type_name_of_file`) file; random valid
    blocks (fast to make at this size, their float16 scales around `scale`) where the file holds that type, random
    values elsewhere."""
    import dataclasses

    import gguf
    import numpy as np
    import torch

    from comfyui_krea.model_loader.flux import FLUX_DEV, FluxTransformer
    from comfyui_krea.model_loader.flux.gguf_files import flux_gguf_type
    from comfyui_krea.model_loader.gguf import QUANT_TYPES
    from comfyui_krea.model_loader.gguf.encode import random_blocks

    config = dataclasses.replace(FLUX_DEV, depth=double, depth_single_blocks=single)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FluxTransformer(config).state_dict().items()}
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, shape in shapes.items():
        type_name = flux_gguf_type(key, shape, type_name_of_file)
        if type_name == type_name_of_file:
            qtype = QUANT_TYPES[type_name]
            blocks = random_blocks(qtype, shape[0] * shape[1] // qtype.block_size, rng, scale)
            writer.add_tensor(key, blocks.reshape(shape[0], qtype.row_bytes(shape[1])),
                              raw_dtype=gguf.GGMLQuantizationType[type_name])
        else:
            values = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
            ggml = gguf.GGMLQuantizationType[type_name]
            writer.add_tensor(key, gguf.quants.quantize(values, ggml),
                              raw_dtype=None if type_name == "F32" else ggml)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def run_child(mode: str, path: Path, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], check=True, capture_output=True,
                         text=True, env=env)
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def memory_bench(double: int, single: int, repeats: int) -> bool:
    folder = Path(tempfile.mkdtemp(prefix="krea_bench_gguf_"))
    try:
        path = folder / "flux_reduced_depth_Q4_K.gguf"
        start = time.perf_counter()
        run_child("write", path, {**os.environ, "KREA_BENCH_DEPTHS": f"{double},{single}"})
        size = path.stat().st_size
        log.info("wrote %s: %.2f GB (%d double + %d single blocks, hidden 3072) in %.0f s", path.name, size / 1e9,
                 double, single, time.perf_counter() - start)
        loads = [run_child("load", path) for _ in range(repeats)]
        forward = run_child("forward", path)
        peak = max(r["peak_after_touch"] for r in loads)
        log.info("load_flux + touch every weight: %.2f s (load_flux alone %.3f s), peak RSS +%.3f GB = %.3f x file",
                 min(r["touched_s"] for r in loads), min(r["load_s"] for r in loads), peak / 1e9, peak / size)
        log.info("then one forward pass: peak RSS +%.3f GB = %.3f x file (the largest layer, 21504x3072, is "
                 "dequantized to float32 for its call: +0.26 GB)", forward["peak_after_forward"] / 1e9,
                 forward["peak_after_forward"] / size)
        ok = peak <= RSS_TARGET * size
        log.info("target load peak RSS <= %.1f x file size: %s", RSS_TARGET, "PASS" if ok else "FAIL")
        return ok
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="measurements of each kind; the best is kept")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks of the memory test (default 2)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks of the memory test (default 2)")
    parser.add_argument("--comfyui-gguf", type=Path, default=None, help="a ComfyUI-GGUF folder (its dequant.py)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The memory test first: its children fork from this process while it is still small (ru_maxrss is
    # inherited at fork).
    ok = True if args.skip_memory else memory_bench(args.double, args.single, args.repeats)
    dequant_bench(args.repeats, args.comfyui_gguf)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
