"""GGML tensor type ids -> what the pack knows of each: name, block layout, bits per weight, whether it reads it.

A GGUF tensor is stored as rows of blocks: `block_size` weights packed into `block_bytes` bytes (1 and the
dtype's size for the plain float types). These are the GGML format's own numbers (the `gguf` package's
GGML_QUANT_SIZES, checked by the tests); the pack reads every type ComfyUI-GGUF reads for FLUX and refuses the
others by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantType:
    name: str
    ggml_id: int  # the type's number in the GGUF tensor table
    block_size: int  # weights per block
    block_bytes: int  # bytes per block
    dense: torch.dtype | None = None  # the plain float types: their torch dtype (no blocks to unpack)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    @property
    def quantized(self) -> bool:
        return self.dense is None

    def row_bytes(self, row_length: int) -> int:
        """Bytes of one row of `row_length` weights (a multiple of the block size)."""
        return row_length // self.block_size * self.block_bytes


QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in (
    QuantType("F32", 0, 1, 4, torch.float32),
    QuantType("F16", 1, 1, 2, torch.float16),
    QuantType("BF16", 30, 1, 2, torch.bfloat16),
    QuantType("Q8_0", 8, 32, 34),
    QuantType("Q5_1", 7, 32, 24),
    QuantType("Q5_0", 6, 32, 22),
    QuantType("Q4_1", 3, 32, 20),
    QuantType("Q4_0", 2, 32, 18),
    QuantType("Q6_K", 14, 256, 210),
    QuantType("Q5_K", 13, 256, 176),
    QuantType("Q4_K", 12, 256, 144),
    QuantType("Q3_K", 11, 256, 110),
    QuantType("Q2_K", 10, 256, 84),
)}
BY_ID: dict[int, QuantType] = {t.ggml_id: t for t in QUANT_TYPES.values()}
SUPPORTED_NAMES = ", ".join(QUANT_TYPES)


def quant_type(ggml_id: int, type_name: str) -> QuantType:
    """The type of a tensor table entry; ValueError naming the type when the pack does not read it."""
    found = BY_ID.get(ggml_id)
    if found is None:
        raise ValueError(f"tensor type {type_name} is not supported (supported: {SUPPORTED_NAMES})")
    return found
