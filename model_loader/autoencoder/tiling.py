"""Memory planning and overlapped tiles for the autoencoder.

A 2048x2048 decode in float32 holds several (256, 2048, 2048) activations at once (about 4 GiB each), so
large images are split: the estimate below walks the architecture stage by stage, and when the whole
image does not fit the memory at hand (available RAM on CPU, free memory on CUDA), the batch is split and
then the image is cut into overlapping tiles. Tiles are blended with linear ramps across each overlap, so
the seams fade instead of showing as edges. Tiling is an approximation (group norms and the mid attention
see one tile, not the whole image); an untiled pass is used whenever it fits.

All tile geometry is in latent pixels, so encoder tiles start on multiples of the downscale factor.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..memory import available_memory
from .config import AutoEncoderConfig

log = logging.getLogger(__name__)

# Share of the memory at hand one pass may plan to use (the rest: the weights' pages, the caller, fragmentation).
_CPU_BUDGET_SHARE = 0.7
_CUDA_BUDGET_SHARE = 0.8
# Measured peak / estimated peak (oneDNN reorder buffers on CPU, cuDNN workspaces and the caching allocator).
_CPU_OVERHEAD = 1.5
_CUDA_OVERHEAD = 1.35
# Automatic tile sides in image pixels, largest first; overlap is 1/8 of the side (ComfyUI: 512 and 64).
_AUTO_TILE_SIDES = (1024, 768, 512, 384, 256)


@dataclass(frozen=True)
class TilePlan:
    batch_chunk: int   # samples per pass
    tile: int | None   # largest tile side in latent pixels; None: the whole image in one pass
    overlap: int       # latent pixels shared by neighbouring tiles


def _resnet_peak(c_in: int, c_out: int) -> int:
    # Channels alive at once (per pixel): input + normalized copy + conv1 output; then input + two c_out.
    return max(2 * c_in + c_out, c_in + 2 * c_out)


def _mid_stages(held: int, channels: int, attention: bool, pixels: int) -> dict[str, int]:
    # The caller keeps the mid block's input while it runs: from the second stage on it is one more tensor.
    stages = {"mid.block_1": held + _resnet_peak(channels, channels) * pixels}
    if attention:
        stages["mid.attn_1"] = held + 7 * channels * pixels  # that input + x, normed, q, k, v, v's token copy
    stages["mid.block_2"] = held + (channels + _resnet_peak(channels, channels)) * pixels
    return stages


def stage_elements(config: AutoEncoderConfig, kind: str, h: int, w: int) -> dict[str, int]:
    """Activation elements alive at the peak of each stage of one sample's pass, by the name of the module
    that runs it; (h, w) in latent pixels. Counts the tensors the stage makes and those its callers still
    hold (the pass's input throughout); not the scratch buffers inside convolution kernels (the overhead)."""
    widths = config.level_channels
    levels = len(widths)
    stages: dict[str, int] = {}
    if kind == "decode":
        held = config.z_channels * h * w  # the latents, referenced until the pass returns
        pixels = h * w
        block_in = widths[-1]
        stages["conv_in"] = held + block_in * pixels
        stages.update(_mid_stages(held, block_in, config.mid_attention, pixels))
        for i in reversed(range(levels)):
            for j in range(config.num_res_blocks + 1):
                stages[f"up.{i}.block.{j}"] = held + _resnet_peak(block_in, widths[i]) * pixels
                block_in = widths[i]
            if i != 0:  # input, then its nearest-upsampled copy and the conv output at four times the pixels
                stages[f"up.{i}.upsample"] = held + (block_in + 8 * block_in) * pixels
                pixels *= 4
        stages["norm_out"] = held + 2 * block_in * pixels
        stages["conv_out"] = held + (block_in + config.out_channels) * pixels
    elif kind == "encode":
        f = config.downscale_factor
        rows, cols = h * f, w * f
        held = config.in_channels * rows * cols  # the images, referenced until the pass returns
        block_in = config.ch
        stages["conv_in"] = held + block_in * rows * cols
        for i, width in enumerate(widths):
            for j in range(config.num_res_blocks):
                stages[f"down.{i}.block.{j}"] = held + _resnet_peak(block_in, width) * rows * cols
                block_in = width
            if i != levels - 1:  # input, its copy padded right and bottom, the stride-2 conv output
                padded = (rows + 1) * (cols + 1)
                stages[f"down.{i}.downsample"] = held + block_in * (rows * cols + padded + rows // 2 * (cols // 2))
                rows, cols = rows // 2, cols // 2
        stages.update(_mid_stages(held, block_in, config.mid_attention, rows * cols))
        stages["norm_out"] = held + 2 * block_in * rows * cols
        stages["conv_out"] = held + (block_in + 2 * config.z_channels) * rows * cols
    else:
        raise ValueError(f"kind must be 'encode' or 'decode', not {kind!r}")
    return stages


def activation_elements(config: AutoEncoderConfig, kind: str, h: int, w: int) -> int:
    """Peak number of activation elements of one sample's pass; (h, w) in latent pixels."""
    return max(stage_elements(config, kind, h, w).values())


def estimate_bytes(config: AutoEncoderConfig, kind: str, h: int, w: int, dtype: torch.dtype,
                   device: torch.device) -> int:
    """Estimated peak bytes of one sample's pass, with the measured allocator/library overhead."""
    overhead = _CUDA_OVERHEAD if device.type == "cuda" else _CPU_OVERHEAD
    element = torch.empty((), dtype=dtype).element_size()
    return int(activation_elements(config, kind, h, w) * element * overhead)


def plan(config: AutoEncoderConfig, kind: str, batch: int, h: int, w: int, dtype: torch.dtype,
         device: torch.device, tile_size: int | None = None, tile_overlap: int | None = None,
         budget_bytes: int | None = None) -> TilePlan:
    """How to run a pass over a (batch, h, w latent pixels) input: explicit tiles, or what fits the budget."""
    f = config.downscale_factor
    if tile_size is not None:
        if tile_size <= 0 or tile_size % f:
            raise ValueError(f"tile_size must be a positive multiple of {f} image pixels, got {tile_size}.")
        overlap_px = tile_size // 4 if tile_overlap is None else tile_overlap
        if overlap_px < 0 or overlap_px % f or overlap_px >= tile_size:
            raise ValueError(f"tile_overlap must be a multiple of {f} smaller than tile_size ({tile_size}), "
                             f"got {overlap_px}.")
        return TilePlan(batch, tile_size // f, overlap_px // f)

    if budget_bytes is None:
        share = _CUDA_BUDGET_SHARE if device.type == "cuda" else _CPU_BUDGET_SHARE
        budget_bytes = int(available_memory(device) * share)
    whole = estimate_bytes(config, kind, h, w, dtype, device)
    if whole * batch <= budget_bytes:
        return TilePlan(batch, None, 0)
    if whole <= budget_bytes:
        chunk = max(1, budget_bytes // whole)
        log.info("VAE %s: %d images of %dx%d in chunks of %d (estimated %.1f GiB each, budget %.1f GiB).",
                 kind, batch, w * f, h * f, chunk, whole / 2**30, budget_bytes / 2**30)
        return TilePlan(chunk, None, 0)
    chosen = _AUTO_TILE_SIDES[-1] // f
    for side_px in _AUTO_TILE_SIDES:
        side = side_px // f
        if estimate_bytes(config, kind, min(side, h), min(side, w), dtype, device) <= budget_bytes:
            chosen = side
            break
    else:
        log.warning("VAE %s: even %d px tiles may not fit the %.1f GiB at hand; trying them anyway.",
                    kind, _AUTO_TILE_SIDES[-1], budget_bytes / 2**30)
    overlap = max(1, chosen // 8)
    log.info("VAE %s of %dx%d: %.1f GiB estimated, %.1f GiB at hand: tiles of %d px, overlap %d px.",
             kind, w * f, h * f, whole / 2**30, budget_bytes / 2**30, chosen * f, overlap * f)
    return TilePlan(1, chosen, overlap)


def axis_tiles(length: int, max_tile: int, overlap: int) -> tuple[int, list[int]]:
    """(tile length, starts) covering [0, length) with the fewest tiles of at most `max_tile`, each pair of
    neighbours sharing at least `overlap`; tiles are shrunk to the smallest length that still covers, so
    no work is spent on needlessly wide overlaps."""
    if length <= max_tile:
        return length, [0]
    count = math.ceil((length - overlap) / (max_tile - overlap))
    tile = math.ceil((length + (count - 1) * overlap) / count)
    return tile, [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _ramp(starts: list[int], index: int, tile: int, scale: int) -> torch.Tensor:
    """1-D blend weight of one tile at output resolution: rises across the overlap with the previous tile,
    falls across the overlap with the next; the two ramps of an overlap sum to one."""
    start = starts[index]
    size = tile * scale
    pos = torch.arange(size, dtype=torch.float32) + 0.5
    weight = torch.ones(size)
    if index > 0:
        rise = (starts[index - 1] + tile - start) * scale
        if rise > 0:
            weight = torch.minimum(weight, pos / rise)
    if index < len(starts) - 1:
        fall = (start + tile - starts[index + 1]) * scale
        if fall > 0:
            weight = torch.minimum(weight, (size - pos) / fall)
    return weight


def run(plan_: TilePlan, x: torch.Tensor, pass_fn: Callable[[torch.Tensor], torch.Tensor], in_scale: int,
        out_scale: int, out_channels: int, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Apply `pass_fn` (input pixels -> output pixels, spatial ratio out_scale/in_scale) as the plan says.

    x: (B, C, H, W) with H, W multiples of in_scale; returns (B, out_channels, H/in*out, W/in*out) float32.
    """
    batch = x.shape[0]
    h, w = x.shape[-2] // in_scale, x.shape[-1] // in_scale  # latent pixels
    chunks = list(range(0, batch, plan_.batch_chunk))
    if plan_.tile is None:
        parts = []
        for done, first in enumerate(chunks, start=1):
            parts.append(pass_fn(x[first:first + plan_.batch_chunk]))
            if callback is not None:
                callback(done, len(chunks))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    tile_h, rows = axis_tiles(h, plan_.tile, plan_.overlap)
    tile_w, cols = axis_tiles(w, plan_.tile, plan_.overlap)
    out = torch.zeros(batch, out_channels, h * out_scale, w * out_scale, dtype=torch.float32, device=x.device)
    weight_sum = torch.zeros(h * out_scale, w * out_scale, dtype=torch.float32, device=x.device)
    total = len(chunks) * len(rows) * len(cols)
    done = 0
    for first in chunks:
        part = x[first:first + plan_.batch_chunk]
        for ri, top in enumerate(rows):
            bottom = top + tile_h
            row_weight = _ramp(rows, ri, tile_h, out_scale).to(x.device)
            for ci, left in enumerate(cols):
                right = left + tile_w
                weight = row_weight[:, None] * _ramp(cols, ci, tile_w, out_scale).to(x.device)[None, :]
                piece = pass_fn(part[..., top * in_scale:bottom * in_scale, left * in_scale:right * in_scale])
                ys = slice(top * out_scale, bottom * out_scale)
                xs = slice(left * out_scale, right * out_scale)
                out[first:first + plan_.batch_chunk, :, ys, xs] += piece * weight
                if first == 0:
                    weight_sum[ys, xs] += weight
                done += 1
                if callback is not None:
                    callback(done, total)
    return out.div_(weight_sum)
