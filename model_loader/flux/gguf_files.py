"""FLUX transformers -> GGUF files laid out as ComfyUI-GGUF's converter and quantizer write them (fixtures).

The layout: BFL key names (no prefix), architecture "flux"; 1-D tensors and tensors of at most 1024 values in
F32; the embedders and the final layer (txt_in, img_in, time_in, vector_in, guidance_in, final_layer) kept in
the base type (BF16 for a bf16 source); every other weight in the chosen block type, or F16 where its rows
are not a whole number of blocks (as llama.cpp's quantizer falls back for K-quants).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..checkpoints import TensorSource
from ..gguf.types import QUANT_TYPES
from ..gguf.writing import GGUFEntry, write_gguf
from .model import FluxConfig
from .random_weights import RandomFluxSource

KEPT_IN_BASE_TYPE = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
SMALL = 1024  # values: at most this many stay F32


def flux_gguf_type(key: str, shape: tuple[int, ...], qtype: str, base: str = "BF16") -> str:
    """The block type ComfyUI-GGUF's tools give one FLUX tensor in a `qtype` file made from a `base` source."""
    if len(shape) <= 1 or math.prod(shape) <= SMALL:
        return "F32"
    if key.startswith(KEPT_IN_BASE_TYPE):
        return base
    if shape[-1] % QUANT_TYPES[qtype].block_size:
        return "F16"
    return qtype


def write_flux_gguf(path: str | os.PathLike[str], source: TensorSource, qtype: str, base: str = "BF16",
                    prefix: str = "") -> Path:
    """A FLUX transformer (BFL keys) as a `qtype` GGUF file; `prefix` is put before every name (e.g.
    "model.diffusion_model.", as some converters leave it)."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"Unknown GGUF type {qtype!r}; choose one of: {', '.join(QUANT_TYPES)}.")
    entries: list[GGUFEntry] = [(prefix + k, lambda k=k: source.tensor(k),
                                 flux_gguf_type(k, source.shape(k), qtype, base)) for k in source.keys()]
    return write_gguf(path, entries, "flux")


def write_random_flux_gguf(path: str | os.PathLike[str], config: FluxConfig, qtype: str, seed: int = 0,
                           prefix: str = "") -> Path:
    """Random weights (the same numbers as write_random_flux_checkpoint's for the seed, rounded to bf16 first,
    as a bf16 release is) quantized to `qtype`."""
    return write_flux_gguf(path, RandomFluxSource(config, seed, torch.bfloat16), qtype, prefix=prefix)
