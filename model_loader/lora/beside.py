"""A quantized Linear's low-rank LoRA deltas -> one callable run beside its matmul: x (..., in) -> (..., out), the sum
over the deltas of scale * x @ downᵀ @ upᵀ in each delta's rows.

GGUF layers (operations.QuantizedLinear) keep their weights as blocks and dequantize them at each call, so a LoRA
cannot be merged into them once. Patching the dequantized weight at each call instead (what ComfyUI does for weights
it cannot merge) costs a (out, in) product and sum per layer and step; here the LoRA stays its factors and costs
two thin matrix products: rank x (in + out) multiply-adds per token instead of out x in.

All the layer's deltas are stacked into one pair (down (R, in), up (out, R), R the sum of their ranks), each delta's
scale folded into its `up` and its rows placed where the layer's output has them (a diffusers q, k or v piece of
the fused qkv fills its third, the rest zeros), so the adapter is two matmuls whatever the number of LoRAs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .deltas import LayerDelta


def is_low_rank(delta: LayerDelta) -> bool:
    """Whether the delta runs beside a matmul as (up, down): LoRA factors that change no bias."""
    return delta.kind == "lora" and "diff_b" not in delta.tensors


# One delta as run beside a matmul: (first row, up (rows, rank), down (rank, in), scale).
Piece = tuple[int, Tensor, Tensor, float]


class LowRankAdapter:
    """Low-rank pieces of one layer with `out_features` outputs as one (down, up), held on `device` in `dtype`."""

    def __init__(self, out_features: int, pieces: Sequence[Piece], device: torch.device | str,
                 dtype: torch.dtype) -> None:
        downs, ups = [], []
        for row_start, up, down, scale in pieces:
            placed = torch.zeros(out_features, up.shape[1], device=device)
            placed[row_start: row_start + up.shape[0]] = up.to(device, torch.float32) * scale
            downs.append(down.to(device, torch.float32))
            ups.append(placed)
        self.down = torch.cat(downs).to(dtype)  # (R, in)
        self.up = torch.cat(ups, dim=1).to(dtype)  # (out, R)

    @classmethod
    def of_deltas(cls, out_features: int, deltas: Sequence[LayerDelta], device: torch.device | str,
                  dtype: torch.dtype) -> LowRankAdapter:
        pieces = []
        for delta in deltas:
            factors = delta.low_rank(device)
            assert factors is not None and is_low_rank(delta), delta.kind
            up, down, scale = factors  # (rows, rank), (rank, in) float32, rows in the layer's order
            pieces.append((delta.row_start, up, down, scale))
        return cls(out_features, pieces, device, dtype)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        down, up = self.down, self.up
        if down.device != x.device or down.dtype != x.dtype:  # a model moved or run in another dtype
            down, up = down.to(x.device, x.dtype), up.to(x.device, x.dtype)
        return F.linear(F.linear(x, down), up)
