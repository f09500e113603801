"""A planned LoRA file and its strength -> one `LayerDelta` per adapter: the change to one Linear's weight rows in
real units, kept as the file's factors until someone asks for the matrix.

The scale of each kind follows ComfyUI's LoRA code (what LoraLoaderModelOnly does inside ComfyUI, so that both
hosts make the same image from the same file):

  lora   weight[rows] += strength * alpha / rank * (up @ down)        rank = down's rows; no alpha: alpha = rank
  loha   weight[rows] += strength * alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)     rank = w1_b's rows
  lokr   weight[rows] += strength * alpha / dim * kron(w1, w2)        w1 = w1_a @ w1_b when factored (likewise
                                                                      w2); dim = the rank of w2's factors, else
                                                                      of w1's; neither factored: alpha unused
  diff   weight[rows] += strength * diff,  bias[rows] += strength * diff_b

A low-rank delta stays (up, down, scale) (`low_rank()`), so that layers which cannot merge (quantized weights)
can run it beside their matmul; `weight_delta()` gives the (rows, in) matrix for merging.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .reading import LoraPlan

F32 = torch.float32


def _swap_rows(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


@dataclass(frozen=True)
class LayerDelta:
    """One adapter's change to rows [row_start, row_start + rows) of one Linear (BFL module name `layer`)."""
    layer: str
    row_start: int
    rows: int
    kind: str  # "lora", "loha", "lokr" or "diff"
    tensors: Mapping[str, Tensor]  # role -> the file's tensor (memory-mapped, any float dtype)
    scale: float  # strength x the kind's alpha rule
    swap_halves: bool  # diffusers' norm_out: the delta's two row halves are swapped into BFL's order

    def low_rank(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, float] | None:
        """(up (rows, rank), down (rank, in), scale) in float32 with delta = scale * up @ down, rows already in
        the layer's order; None for kinds that are not low rank."""
        if self.kind != "lora":
            return None
        up = self.tensors["up"].to(device, F32)
        return (_swap_rows(up) if self.swap_halves else up), self.tensors["down"].to(device, F32), self.scale

    def weight_delta(self, device: torch.device | str = "cpu") -> Tensor | None:
        """The (rows, in) float32 change to the weight rows, scale applied (None: a bias-only diff)."""
        t = {role: v.to(device, F32) for role, v in self.tensors.items() if role != "alpha"}
        if self.kind == "lora":
            delta = t["up"] @ t["down"]
        elif self.kind == "loha":
            delta = (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])
        elif self.kind == "lokr":
            w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
            w2 = t["w2"] if "w2" in t else t["w2_a"] @ t["w2_b"]
            delta = torch.kron(w1, w2)
        elif "diff" in t:
            delta = t["diff"]
        else:
            return None
        delta = self.scale * delta
        return _swap_rows(delta) if self.swap_halves else delta

    def bias_delta(self, device: torch.device | str = "cpu") -> Tensor | None:
        """The (rows,) float32 change to the bias rows (only `diff` adapters with a diff_b have one)."""
        if "diff_b" not in self.tensors:
            return None
        delta = self.scale * self.tensors["diff_b"].to(device, F32)
        return _swap_rows(delta) if self.swap_halves else delta


def _alpha_scale(kind: str, tensors: Mapping[str, Tensor]) -> float:
    """The kind's alpha / rank factor (1 without an alpha)."""
    if "alpha" not in tensors:
        return 1.0
    alpha = float(tensors["alpha"].float().reshape(()))
    if kind == "lora":
        return alpha / tensors["down"].shape[0]
    if kind == "loha":
        return alpha / tensors["w1_b"].shape[0]
    if kind == "lokr":
        factored = [w for w in ("w2", "w1") if w not in tensors]  # given as (w_a, w_b), not whole
        return alpha / tensors[f"{factored[0]}_b"].shape[0] if factored else 1.0
    return 1.0


def lora_deltas(plan: LoraPlan, strength: float) -> list[LayerDelta]:
    """Every adapter of a planned LoRA file as a LayerDelta at `strength` (tensors stay memory-mapped views)."""
    file = plan.lora.file
    deltas = []
    for item in plan.adapters:
        adapter, target = item.adapter, item.target
        tensors = {role: file.tensor(key) for role, key in adapter.keys.items()}
        deltas.append(LayerDelta(target.layer, target.row_start, target.rows, adapter.kind, tensors,
                                 strength * _alpha_scale(adapter.kind, tensors), target.swap_halves))
    return deltas
