"""Random-weight FLUX transformers in every accepted layout: the fixtures tests, --demo and benchmarks use.

Weights are deterministic per key and seed, made one tensor at a time (a full-size file needs the memory of
its largest tensor), and written through the pack's one atomic writer.
"""
from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoints import Entry, write_safetensors
from ..operations import quantize_fp8
from .layouts import COMFY_PREFIX, LAYOUTS, Rename, diffusers_renames, swap_halves
from .model import FluxConfig, FluxTransformer


def random_flux_tensor(key: str, shape: tuple[int, ...], seed: int, device: str | torch.device = "cpu") -> Tensor:
    """Deterministic float32 weights for one BFL key (independent of the order they are made in).

    Made on `device` with that device's generator: CUDA draws other numbers than the CPU for the same seed.
    """
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
    if key.endswith(".scale"):  # RMSNorm gains around 1
        return 1.0 + 0.1 * noise
    if len(shape) == 2:  # Linear weight: unit gain, keeps deep stacks finite (0.018 at width 3072)
        return noise / shape[1] ** 0.5
    return 0.02 * noise  # biases


class RandomFluxSource:
    """Random weights for `config` in BFL keys, each made on `device` only when the loader reads it.

    For benchmarks of the full-size model: no 23.8 GB file to write first, and at most one float32 tensor
    in flight on top of the model being built.
    """

    def __init__(self, config: FluxConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> None:
        with torch.device("meta"):
            self._shapes = {k: tuple(v.shape) for k, v in FluxTransformer(config).state_dict().items()}
        self._seed, self._dtype, self._device = seed, dtype, torch.device(device)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtype

    def tensor(self, key: str) -> Tensor:
        return random_flux_tensor(key, self._shapes[key], self._seed, self._device).to(self._dtype)


def write_random_flux_checkpoint(path: str | os.PathLike[str], config: FluxConfig, seed: int = 0,
                                 dtype: torch.dtype = torch.float32, layout: str = "bfl") -> Path:
    """Write a random-weight FLUX transformer in one of LAYOUTS; returns what `load_flux` should be given.

    "diffusers": a path ending in .safetensors gets one file; any other path becomes a diffusers model
    folder with transformer/ holding two shards, their index and config.json.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}.")
    path = Path(path)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FluxTransformer(config).state_dict().items()}
    bfl = {k: (lambda k=k, s=s: random_flux_tensor(k, s, seed)) for k, s in shapes.items()}
    entries: list[Entry] = []
    if layout in ("bfl", "comfy"):
        prefix = COMFY_PREFIX if layout == "comfy" else ""
        entries = [(prefix + k, dtype, shapes[k], make) for k, make in bfl.items()]
    elif layout == "comfy_fp8_scaled":
        for k, make in bfl.items():
            if k.startswith(("double_blocks.", "single_blocks.")) and len(shapes[k]) == 2:
                quantized = {}

                def part(i: int, k: str = k, make: Callable[[], Tensor] = make, cache: dict = quantized) -> Tensor:
                    if not cache:
                        cache["q"], cache["s"] = quantize_fp8(make())
                    return cache.pop("q") if i == 0 else cache.pop("s")

                entries.append((COMFY_PREFIX + k, torch.float8_e4m3fn, shapes[k], lambda part=part: part(0)))
                entries.append((COMFY_PREFIX + k[: -len(".weight")] + ".scale_weight", torch.float32, (),
                                lambda part=part: part(1)))
            else:
                entries.append((COMFY_PREFIX + k, dtype, shapes[k], make))
        entries.append((COMFY_PREFIX + "scaled_fp8", torch.float8_e4m3fn, (0,), lambda: torch.empty(0)))
    else:
        entries = _diffusers_entries(config, shapes, bfl, dtype)
    if layout != "diffusers" or path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, entries, {"format": "pt"})
        return path
    return _write_diffusers_folder(path, config, entries)


def _diffusers_entries(config: FluxConfig, shapes: Mapping[str, tuple[int, ...]],
                       bfl: Mapping[str, Callable[[], Tensor]], dtype: torch.dtype
                       ) -> list[Entry]:
    entries = []
    for r in diffusers_renames(config.depth, config.depth_single_blocks, config.guidance_embed, config.qkv_bias):
        full = shapes[r.bfl]
        h = config.hidden_size
        sizes = [full[0]] if len(r.diffusers) == 1 else [h, h, h, full[0] - 3 * h][: len(r.diffusers)]

        def make(r: Rename = r, i: int = 0, sizes: list[int] = sizes) -> Tensor:
            t = bfl[r.bfl]()
            t = swap_halves(t) if r.swap_halves else t
            return torch.split(t, sizes, dim=0)[i].clone()

        for i, name in enumerate(r.diffusers):
            entries.append((name, dtype, (sizes[i], *full[1:]), lambda make=make, i=i: make(i=i)))
    return entries


def _write_diffusers_folder(root: Path, config: FluxConfig, entries: list) -> Path:
    folder = root / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    half = len(entries) // 2
    shards = [entries[:half], entries[half:]]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, shard, {"format": "pt"})
        weight_map.update({e[0]: file for e in shard})
    total = sum(e[1].itemsize * int(torch.Size(e[2]).numel()) for e in entries)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks, "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads, "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim, "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim)}, indent=1))
    return root
