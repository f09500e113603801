"""Benchmark: loading a FLUX transformer file costs about what reading it does, in time and memory.

Writes a full-width, reduced-depth BFL bf16 checkpoint (hidden 3072, context 4096; 2 double + 2 single
blocks, about 2 GB) to a temporary folder, then in fresh subprocesses measures
  read  plain `open().read()` of the whole file into bytes
  load  `load_flux(path)` and touching every weight (a chunked sum, so no full-size temporaries)
with time and peak RSS above the interpreter's baseline after imports (ru_maxrss). Target: the load's
peak RSS above baseline is at most 1.1 x the file size (no second copy of the weights).

    python bench/load.py [--double 2] [--single 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import dataclasses
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

log = logging.getLogger("bench.load")

RSS_TARGET = 1.1  # peak RSS above baseline / file size
TOUCH_CHUNK = 1 << 22  # elements summed at a time while touching weights


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _vm_hwm_bytes() -> int:
    """Linux's per-address-space peak RSS (reset by exec, unlike ru_maxrss, which a child inherits from the
    process it was forked from); 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child(mode: str, path: str) -> None:
    """Runs in a subprocess: one measurement, reported as a JSON line on stdout."""
    import torch

    from comfyui_krea.model_loader.flux import load_flux

    if mode == "write":
        _write_checkpoint(Path(path), *(int(n) for n in os.environ["KREA_BENCH_DEPTHS"].split(",")))
        return
    baseline, baseline_hwm = _peak_rss_bytes(), _vm_hwm_bytes()
    start = time.perf_counter()
    result: dict[str, float] = {}
    if mode == "read":
        with open(path, "rb") as f:
            data = f.read()
        result["bytes"] = len(data)
    else:
        model = load_flux(path)
        result["load_only_s"] = time.perf_counter() - start
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for p in model.parameters():
                for chunk in p.reshape(-1).split(TOUCH_CHUNK):
                    total += chunk.sum(dtype=torch.float32)
        result["checksum"] = float(total)
    result["seconds"] = time.perf_counter() - start
    # Both peak measures above their own baseline; the larger one is kept (they agree when the parent is small).
    result["peak_rss_above_baseline"] = max(_peak_rss_bytes() - baseline, _vm_hwm_bytes() - baseline_hwm)
    result["baseline_rss"] = baseline
    sys.stdout.write(json.dumps(result) + "\n")


def _write_checkpoint(path: Path, double: int, single: int) -> None:
    import torch

    from comfyui_krea.model_loader.flux import FLUX_DEV, write_random_flux_checkpoint

    config = dataclasses.replace(FLUX_DEV, depth=double, depth_single_blocks=single)
    write_random_flux_checkpoint(path, config, seed=0, dtype=torch.bfloat16)


def _run_child(mode: str, path: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], check=True, capture_output=True,
                         text=True, env=env)
    return out.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (default 2)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each kind; the best is kept")
    parser.add_argument("--verbose", action="store_true", help="log every measurement")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    # This process stays small (no torch): a child's ru_maxrss starts from its parent's RSS at fork.
    folder = Path(tempfile.mkdtemp(prefix="krea_bench_load_"))
    try:
        path = folder / "flux_reduced_depth_bf16.safetensors"
        start = time.perf_counter()
        _run_child("write", path, {**os.environ, "KREA_BENCH_DEPTHS": f"{args.double},{args.single}"})
        size = path.stat().st_size
        log.info("wrote %s: %.2f GB (%d double + %d single blocks, hidden 3072, bf16) in %.1f s", path.name,
                 size / 1e9, args.double, args.single, time.perf_counter() - start)
        runs: dict[str, list[dict[str, float]]] = {"read": [], "load": []}
        for _ in range(args.repeats):
            for mode in runs:  # interleaved, so both see the same page-cache state
                runs[mode].append(json.loads(_run_child(mode, path).strip().splitlines()[-1]))
        for mode, results in runs.items():
            for r in results:
                log.debug("%s: %s", mode, r)
        read = min(runs["read"], key=lambda r: r["seconds"])
        load = min(runs["load"], key=lambda r: r["seconds"])
        read_rss = max(r["peak_rss_above_baseline"] for r in runs["read"])
        load_rss = max(r["peak_rss_above_baseline"] for r in runs["load"])
        log.info("plain read:        %6.2f s  %5.2f GB/s  peak RSS +%.2f GB (%.2f x file)", read["seconds"],
                 size / read["seconds"] / 1e9, read_rss / 1e9, read_rss / size)
        log.info("load_flux + touch: %6.2f s  %5.2f GB/s  peak RSS +%.2f GB (%.2f x file); load_flux alone %.3f s",
                 load["seconds"], size / load["seconds"] / 1e9, load_rss / 1e9, load_rss / size, load["load_only_s"])
        log.info("ratios load/read:  time %.2f  peak RSS %.2f", load["seconds"] / read["seconds"], load_rss / read_rss)
        ok = load_rss <= RSS_TARGET * size
        log.info("target peak RSS above baseline <= %.1f x file size (%.2f GB): %s", RSS_TARGET,
                 RSS_TARGET * size / 1e9, "PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
