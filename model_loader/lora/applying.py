"""A FLUX transformer and a set of (LoRA file, strength) -> the same transformer with exactly that set merged into its
weights; a new set first puts back the base weights, bit for bit.

Merging happens once per set: each changed Linear's weight is taken into real units (the stored weight times its
scale_weight, operations.real_weight), every delta of the set is added in float32, in the order given, and the sum
is stored back as the layer stores weights (operations.stored_weight: bf16/fp16 rounded to nearest, scaled fp8
requantized under its scale). This is what ComfyUI's ModelPatcher does for its own LoRA patches, with
round-to-nearest where it rounds fp8 stochastically. Sampling then runs on plain weights: no per-step cost.

Only the changed layers are backed up, on `backup_device` (the CPU): where a weight already lives there, the
backup is the original tensor itself (memory-mapped from the file when it was loaded as stored) and the merged
weight is a new tensor beside it; on a GPU the original is copied to the CPU and the merge is written in place,
so GPU memory does not grow. Changing the set never reads the base file again.

GGUF layers (operations.QuantizedLinear holding blocks) cannot take a merge: their LoRA factors run beside the
matmul instead (beside.py: x @ downᵀ @ upᵀ * scale, one adapter per layer), and taking the set out removes the
adapter, so the layer computes exactly what it did. A LoHa, LoKr or full difference, which has no low-rank form,
is merged into a dequantized copy of just that layer (held in the model's compute dtype, the blocks kept beside it
and put back with the base): that layer then costs its dense size in memory and no dequantization per call.

Every file of a new set is read and checked (header and shapes, reading.py) before any weight changes, so a bad
file leaves the model as it was. Not thread-safe: one set per model at a time (the standalone runner runs one
workflow at a time).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoints import file_identity
from ..flux.model import FluxConfig
from ..operations import real_weight, stored_weight
from .beside import LowRankAdapter, is_low_rank
from .deltas import LayerDelta, lora_deltas
from .formats import module_targets
from .reading import LoraPlan, plan_lora, read_lora

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA of a set: its file and strength (ComfyUI's strength_model; negative values subtract it)."""
    path: Path
    strength: float = 1.0


@dataclass(frozen=True)
class _Original:
    """What one merged layer held before: the tensors themselves, or copies of their data (`in_place`)."""
    weight: Tensor
    bias: Tensor | None
    scale: Tensor | None
    in_place: bool
    quant_type: object | None = None  # a GGUF layer merged into a dense copy: `weight` is its blocks


@dataclass(frozen=True)
class LoraState:
    """The set merged into a model (`model.lora_state`), the original of every layer it changed and the adapters each
    quantized layer had before the set's were added beside its matmul."""
    key: tuple
    loras: tuple[LoraChoice, ...]
    originals: dict[str, _Original]
    adapters_before: dict[str, list] = field(default_factory=dict)


def set_key(loras: Sequence[LoraChoice]) -> tuple:
    """What identifies a set: each file (path, size, modification time) with its strength, in order. Strength 0
    leaves a LoRA out, as ComfyUI's loader does."""
    return tuple((file_identity(c.path), float(c.strength)) for c in loras if c.strength != 0)


def plan_loras(loras: Sequence[LoraChoice], config: FluxConfig) -> list[tuple[LoraPlan, float]]:
    """Each file of the set read and checked against `config` (headers only): (plan, strength)."""
    targets = module_targets(config)
    return [(plan_lora(read_lora(c.path), config, targets), c.strength) for c in loras if c.strength != 0]


def layer_deltas(plans: Sequence[tuple[LoraPlan, float]]) -> dict[str, list[LayerDelta]]:
    """BFL layer name -> its deltas in the order of the set (the form for layers that apply them beside a matmul)."""
    by_layer: dict[str, list[LayerDelta]] = {}
    for plan, strength in plans:
        for delta in lora_deltas(plan, strength):
            by_layer.setdefault(delta.layer, []).append(delta)
    return by_layer


def applied_loras(model: nn.Module) -> tuple[LoraChoice, ...]:
    """The set merged into `model` now (empty: the base weights)."""
    state: LoraState | None = getattr(model, "lora_state", None)
    return state.loras if state is not None else ()


def set_loras(model: nn.Module, loras: Sequence[LoraChoice], backup_device: torch.device | str = "cpu") -> nn.Module:
    """Make `model` (a FluxTransformer) carry exactly `loras`, merged; nothing happens when it already does.
    ModelFileError (the model untouched) when a file is not a LoRA that fits it."""
    loras = tuple(LoraChoice(Path(c.path), float(c.strength)) for c in loras)
    key = set_key(loras)
    state: LoraState | None = getattr(model, "lora_state", None)
    if (state.key if state is not None else ()) == key:
        return model
    plans = plan_loras(loras, model.config)  # every file checked before any weight changes
    restore_base(model)
    if not plans:
        return model
    started = time.perf_counter()
    originals: dict[str, _Original] = {}
    adapters_before: dict[str, list] = {}
    backup = torch.device(backup_device)
    dense_dtype = getattr(model, "compute_dtype", torch.float32)
    try:
        with torch.no_grad():
            for name, deltas in layer_deltas(plans).items():
                layer = model.get_submodule(name)
                if _quantized(layer) and all(is_low_rank(d) for d in deltas):
                    adapters_before[name] = layer.adapters
                    adapter = LowRankAdapter.of_deltas(layer.out_features, deltas, layer.weight.device, dense_dtype)
                    layer.adapters = [*layer.adapters, adapter]
                else:
                    originals[name] = _merge(layer, deltas, backup, dense_dtype)
    except BaseException:
        _put_back(model, originals, adapters_before)  # a failure half-way (out of memory, Ctrl-C): the base
        raise
    model.lora_state = LoraState(key, loras, originals, adapters_before)
    log.info("Applied %d LoRA%s to %d layers in %.2f s (%d merged, %d beside quantized matmuls): %s", len(plans),
             "" if len(plans) == 1 else "s", len(originals) + len(adapters_before), time.perf_counter() - started,
             len(originals), len(adapters_before),
             ", ".join(f"{os.path.basename(c.path)} x{c.strength:g}" for c in loras if c.strength != 0))
    return model


def _quantized(layer: nn.Module) -> bool:
    """A Linear holding GGUF blocks (it dequantizes them at each call)."""
    return getattr(layer, "quant_type", None) is not None


def restore_base(model: nn.Module) -> nn.Module:
    """Put back the weights the model had before its LoRA set was merged, bit for bit."""
    state: LoraState | None = getattr(model, "lora_state", None)
    if state is not None:
        _put_back(model, state.originals, state.adapters_before)
        model.lora_state = None
    return model


def _merge(layer: nn.Module, deltas: list[LayerDelta], backup: torch.device, dense_dtype: torch.dtype) -> _Original:
    """Add every delta to one Linear, in real units; returns what the layer held before. A GGUF layer is merged into
    a dequantized copy held in `dense_dtype`."""
    weight, bias = layer.weight, layer.bias
    scale = getattr(layer, "scale_weight", None)
    quant_type = getattr(layer, "quant_type", None)
    if quant_type is not None:  # (out, in) float32 on the blocks' device
        real = layer.dequantized_weight(weight.device, torch.float32)
    else:
        real = real_weight(layer)  # (out, in) float32 on the weight's device
    real_bias = bias.detach().to(torch.float32, copy=True) if bias is not None else None
    bias_changed = False
    for delta in deltas:
        rows = slice(delta.row_start, delta.row_start + delta.rows)
        factors = delta.low_rank(real.device)
        if factors is not None:  # rows += scale * up @ down, without a (rows, in) temporary
            up, down, factor = factors
            real[rows].addmm_(up, down, alpha=factor)
        else:
            change = delta.weight_delta(real.device)
            if change is not None:
                real[rows] += change
        change = delta.bias_delta(real.device)
        if change is not None and real_bias is not None:
            real_bias[rows] += change
            bias_changed = True
    if quant_type is not None:  # the blocks stay as they are, beside the dense copy that replaces them
        new_weight, new_scale = real.to(dense_dtype), scale
    else:
        new_weight, new_scale = stored_weight(real, weight.dtype, scale)
    del real
    in_place = weight.device != backup and quant_type is None
    if in_place:  # weights on an accelerator: the original goes to the backup device, the merge stays in place
        original = _Original(weight.detach().to(backup, copy=True),
                             bias.detach().to(backup, copy=True) if bias_changed else None, scale, True)
        weight.data.copy_(new_weight)
        if bias_changed:
            bias.data.copy_(real_bias.to(bias.dtype))
    else:  # weights already on the backup device: keep the original tensors, merge into new ones
        original = _Original(weight, bias if bias_changed else None, scale, False, quant_type)
        layer.weight = nn.Parameter(new_weight, requires_grad=False)
        if quant_type is not None:
            layer.quant_type = None  # computes as a CastLinear until the blocks are put back
        if bias_changed:
            layer.bias = nn.Parameter(real_bias.to(bias.dtype), requires_grad=False)
    if new_scale is not scale:
        layer.scale_weight = new_scale
    return original


def _put_back(model: nn.Module, originals: dict[str, _Original], adapters_before: dict[str, list]) -> None:
    for name, adapters in adapters_before.items():
        model.get_submodule(name).adapters = adapters
    with torch.no_grad():
        for name, original in originals.items():
            layer = model.get_submodule(name)
            if original.in_place:
                layer.weight.data.copy_(original.weight)
                if original.bias is not None:
                    layer.bias.data.copy_(original.bias)
            else:
                layer.weight = original.weight
                if original.bias is not None:
                    layer.bias = original.bias
            if original.scale is not None or getattr(layer, "scale_weight", None) is not None:
                layer.scale_weight = original.scale
            if original.quant_type is not None:
                layer.quant_type = original.quant_type
