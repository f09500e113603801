"""Benchmark: peak memory and time of decoding a large image with the full-size FLUX autoencoder, tiled vs untiled.

The autoencoder has FLUX's full architecture (ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, 16 latent
channels; random float32 weights built in memory, no file). Each decode runs in a fresh subprocess on the
CPU; its peak RSS above the baseline taken after the model is built and warmed up (VmHWM / ru_maxrss) is
the memory the decode itself needed.

  tiled     SIZE x SIZE with tiles of at most TILE px (ComfyUI's default 512, overlap 64)
  untiled   SIZE x SIZE in one pass, if the autoencoder's own estimate says it fits the RAM available now;
            otherwise the largest of SIZE/2, SIZE/4... that fits (reported as such, and scaled up by the
            pixel count for the ratio, which is how activation memory grows)

    python bench/vae.py [--size 2048] [--tile 512] [--overlap 64] [--untiled-size N]

Takes about 5 minutes at 2048 px on 2 CPU cores (about 50 TFLOP per decode, tiled or not).
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

log = logging.getLogger("bench.vae")

SAFETY = 1.15  # run untiled only if estimate x SAFETY fits the memory available now


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return max(peak, int(line.split()[1]) * 1024)
    except OSError:
        pass
    return peak


def child(mode: str, size: int, tile: int, overlap: int) -> None:
    """Runs in a subprocess; prints one JSON line."""
    import torch

    from comfyui_krea.model_loader.autoencoder import FLUX_AUTOENCODER, build_random_autoencoder, tiling

    f = FLUX_AUTOENCODER.downscale_factor
    cpu = torch.device("cpu")
    if mode == "probe":
        estimate = tiling.estimate_bytes(FLUX_AUTOENCODER, "decode", size // f, size // f, torch.float32, cpu)
        print(json.dumps({"estimate": estimate, "available": tiling.available_memory(cpu)}))
        return
    model = build_random_autoencoder(FLUX_AUTOENCODER, seed=0)
    latents = torch.randn(1, FLUX_AUTOENCODER.z_channels, size // f, size // f, generator=torch.manual_seed(0))
    model.decode(latents[..., :8, :8])  # warm-up: kernels and thread pools before the baseline
    baseline = _peak_rss_bytes()
    tiles = []
    start = time.perf_counter()
    # Untiled: one tile as large as the image, i.e. one pass (the automatic plan could choose tiles).
    image = model.decode(latents, tile_size=tile if mode == "tiled" else size,
                         tile_overlap=overlap if mode == "tiled" else 0,
                         callback=lambda done, total: tiles.append(total))
    seconds = time.perf_counter() - start
    print(json.dumps({
        "mode": mode, "size": size, "seconds": seconds, "peak_above_baseline": _peak_rss_bytes() - baseline,
        "baseline": baseline, "passes": tiles[-1] if tiles else 1, "finite": bool(torch.isfinite(image).all()),
        "estimate": tiling.estimate_bytes(FLUX_AUTOENCODER, "decode", min(tile, size) // f, min(tile, size) // f,
                                          torch.float32, cpu) if mode == "tiled" else
        tiling.estimate_bytes(FLUX_AUTOENCODER, "decode", size // f, size // f, torch.float32, cpu),
    }))


def _run_child(*args: object) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (default 2048)")
    parser.add_argument("--tile", type=int, default=512, help="largest tile side in pixels (default 512)")
    parser.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (default 64)")
    parser.add_argument("--untiled-size", type=int, default=None,
                        help="side of the untiled reference (default: --size if it fits in memory)")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SIZE", "TILE", "OVERLAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, size, tile, overlap = args.child
        child(mode, int(size), int(tile), int(overlap))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # This process never imports torch: a child's peak RSS must not start from a big parent.
    untiled_size = args.untiled_size
    if untiled_size is None:
        untiled_size = args.size
        while True:
            probe = _run_child("probe", untiled_size, 0, 0)
            if probe["estimate"] * SAFETY <= probe["available"] or untiled_size <= 256:
                break
            log.info("untiled %d x %d would need about %.1f GB (estimate); %.1f GB available now: too much.",
                     untiled_size, untiled_size, probe["estimate"] / 1e9, probe["available"] / 1e9)
            untiled_size //= 2
        if untiled_size != args.size:
            log.info("measuring the untiled reference at %d x %d instead.", untiled_size, untiled_size)

    tiled = _run_child("tiled", args.size, args.tile, args.overlap)
    log.info("tiled    %4d x %-4d tiles <= %d px, overlap %d: %3d passes, %6.1f s, peak RSS +%.2f GB "
             "(estimate %.2f GB)", args.size, args.size, args.tile, args.overlap, tiled["passes"], tiled["seconds"],
             tiled["peak_above_baseline"] / 1e9, tiled["estimate"] / 1e9)
    untiled = _run_child("untiled", untiled_size, 0, 0)
    log.info("untiled  %4d x %-4d                          %3d pass,   %6.1f s, peak RSS +%.2f GB "
             "(estimate %.2f GB)", untiled_size, untiled_size, untiled["passes"], untiled["seconds"],
             untiled["peak_above_baseline"] / 1e9, untiled["estimate"] / 1e9)
    scale = (args.size / untiled_size) ** 2
    untiled_peak = untiled["peak_above_baseline"] * scale
    note = "" if scale == 1 else f" (untiled scaled x{scale:.0f} from {untiled_size} px: an extrapolation)"
    log.info("peak RSS untiled / tiled at %d px: %.1f x%s", args.size, untiled_peak / tiled["peak_above_baseline"],
             note)
    log.info("time tiled / untiled at %d px: %.2f x%s", args.size, tiled["seconds"] / (untiled["seconds"] * scale),
             note)
    log.info("baseline RSS (weights, interpreter): %.2f GB; both outputs finite: %s",
             tiled["baseline"] / 1e9, tiled["finite"] and untiled["finite"])
    return 0 if tiled["finite"] and untiled["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
