"""Layer classes that let weights be stored in one dtype (or GGUF blocks) and computed in another.

Engine modules build their layers from an `operations` namespace (default `torch.nn`). `CastOps` is the
pack's own: its Linear casts its weight to the input's dtype and device at call time (layer by layer, so a
model stored in fp8 computes in bf16 with only one layer's weight upcast at a time) and applies the
per-tensor `scale_weight` of ComfyUI's scaled-fp8 files. It follows the contract of ComfyUI's `comfy.ops`
layers (`comfy_cast_weights`, `weight_function`, `bias_function`), so that inside ComfyUI the host can pass
ComfyUI's own layer classes through the same seam (`OperationsFor`) and ComfyUI can stream them.
`QuantizedOps` is for GGUF files, in and outside ComfyUI: its Linear keeps a block-quantized weight as its
bytes and dequantizes it on the compute device at each call (one layer's weight in float at a time).
"""
from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .gguf.dequantize import dequantize
from .gguf.types import QuantType

log = logging.getLogger(__name__)

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = 448.0  # largest float8_e4m3fn value

_fast_fp8_broken = False  # set when torch._scaled_mm failed once: every layer then takes the upcast path


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled float8_e4m3fn, as ComfyUI's scaled-fp8 files store it: w ~= q.float() * scale,
    with max |w| mapped to 448."""
    w32 = w.to(torch.float32)
    scale = (w32.abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (w32 / scale).to(torch.float8_e4m3fn), scale


def real_weight(layer: nn.Linear) -> torch.Tensor:
    """A Linear's weight in real units: float32 on its device, the stored weight times its `scale_weight` (a new
    tensor; the layer is not touched). What LoRA merging adds to."""
    scale = getattr(layer, "scale_weight", None)
    w = layer.weight.detach().to(torch.float32, copy=True)
    return w.mul_(scale.to(w.device, torch.float32)) if scale is not None else w


def stored_weight(real: torch.Tensor, dtype: torch.dtype,
                  scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A real-unit weight as a layer storing `dtype` (with per-tensor `scale`, fp8 only) holds it: (weight, scale).

    fp8 keeps the scale, so values that did not change round back to their own codes, unless the new values
    would leave fp8's range under it: then the scale grows just enough (a layer stored without a scale gets one).
    """
    if dtype not in FP8_DTYPES:
        return real.to(dtype), scale
    largest = torch.finfo(dtype).max
    amax = real.abs().amax()
    if float(amax) > largest * (float(scale) if scale is not None else 1.0):
        scale = (amax / largest).reshape(())
    if scale is None:
        return real.to(dtype), None
    return (real / scale.to(real.device, torch.float32)).to(dtype), scale


def fp8_matmul_supported(device: torch.device) -> bool:
    """True on GPUs with fp8 matrix units (compute capability 8.9 and newer) and a torch that exposes them."""
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass(frozen=True)
class WeightStorage:
    """How a model about to be built will hold its weights: what picks its layer classes."""
    dtype: torch.dtype          # the blocks' big Linear weights
    compute_dtype: torch.dtype  # what the model computes in on its compute device
    scaled: bool                # per-tensor weight scales (scaled fp8)
    fast_fp8: bool              # fp8 matrix multiplies asked for (weight_dtype fp8_e4m3fn_fast)
    quantized: bool = False     # GGUF blocks, dequantized per layer at call time (dtype is then uint8)


# storage -> an operations namespace (Linear, LayerNorm, Conv2d, GroupNorm, Embedding classes).
OperationsFor = Callable[[WeightStorage], Any]


class CastLinear(nn.Linear):
    """nn.Linear computing in the input's dtype whatever the stored weight dtype.

    `scale_weight` (a 0-d or 1-element tensor, optional): the stored weight is `real_weight / scale`.
    `fast_fp8`: fp8 weights are multiplied with torch._scaled_mm instead of being upcast (falling back to
    the upcast path, with one warning, if the kernel refuses). Whoever sets it has checked
    `fp8_matmul_supported` for the weight's device: forward does not ask the device again, which keeps it
    free of graph breaks under torch.compile.
    """

    scale_weight: torch.Tensor | None
    fast_fp8: bool = False
    # comfy.ops' contract: ComfyUI sets the flag on layers it streams and appends LoRA patches as functions.
    comfy_cast_weights: bool = False
    # Shared empty defaults that ModelPatcher replaces per layer, as in comfy.ops.
    weight_function: list = []
    bias_function: list = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("scale_weight", None, persistent=False)

    def set_scale(self, scale: torch.Tensor | None) -> None:
        self.scale_weight = None if scale is None else scale.reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.fast_fp8 and w.dtype == torch.float8_e4m3fn and not _fast_fp8_broken:
            try:
                return self._scaled_mm(x)
            except RuntimeError as err:  # shapes or layouts this torch/GPU's fp8 kernel refuses
                _disable_fast_fp8(err, x.dtype)
        w = w.to(device=x.device, dtype=x.dtype)
        if self.scale_weight is not None:
            w = w * self.scale_weight.to(device=x.device, dtype=x.dtype)
        for patch in self.weight_function:
            w = patch(w)
        b = self.bias
        if b is not None:
            b = b.to(device=x.device, dtype=x.dtype)
            for patch in self.bias_function:
                b = patch(b)
        return F.linear(x, w, b)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # Per-tensor input scale so activations fit e4m3's range (max 448).
        amax = x2.abs().amax().float().clamp(min=1e-12)
        x_scale = (amax / FP8_MAX).reshape(())
        x8 = (x2.float() / x_scale).to(torch.float8_e4m3fn)
        w_scale = (self.scale_weight if self.scale_weight is not None else torch.ones((), device=x.device))
        out = torch._scaled_mm(
            x8, self.weight.t(), scale_a=x_scale.to(x.device, torch.float32),
            scale_b=w_scale.to(x.device, torch.float32).reshape(()), out_dtype=x.dtype,
            bias=None if self.bias is None else self.bias.to(x.dtype),
        )
        return out.reshape(*shape[:-1], out.shape[-1])


def _disable_fast_fp8(err: RuntimeError, dtype: torch.dtype) -> None:
    global _fast_fp8_broken
    _fast_fp8_broken = True
    log.warning("fp8 matmul failed (%s); computing in %s from now on.", err, dtype)


def cast_operations(storage: WeightStorage) -> types.SimpleNamespace:
    """The pack's own layer classes (the default outside ComfyUI): QuantizedOps for GGUF blocks, else CastOps."""
    return QuantizedOps if storage.quantized else CastOps


CastOps = types.SimpleNamespace(
    Linear=CastLinear,
    Conv2d=nn.Conv2d,
    LayerNorm=nn.LayerNorm,
    GroupNorm=nn.GroupNorm,
    Embedding=nn.Embedding,
)


class QuantizedLinear(CastLinear):
    """CastLinear that can hold its weight as GGUF blocks: uint8 (out_features, row bytes), dequantized on the
    input's device and in its dtype at each call. Without `hold_quantized` it is a CastLinear (GGUF files keep
    some layers in F16/BF16/F32).

    Hooks, in the order forward applies them to a quantized weight:
    - `weight_function` (comfy.ops' contract): patches ComfyUI installs on a layer it streams (LoRA included);
    - `resident_weight_function`: the same for a layer ComfyUI holds resident, which the host wires up: a LoRA
      cannot be merged into block bytes in place, so ComfyUI's merge (`set_weight`) only marks the layer and the
      patches are applied to the dequantized weight at each call;
    - `adapters`: callables x -> (..., out_features) added to the output, for a LoRA kept as its low-rank
      factors beside the matmul (x @ A.T @ B.T * scale) instead of patching the weight (the pack's set_loras);
    - `resident_adapters`: the same, wired up by the host for a layer ComfyUI holds resident, in place of
      `resident_weight_function` where ComfyUI's patches are plain LoRAs; skipped while ComfyUI streams the layer
      (it then puts its own patches in `weight_function`).
    `convert_weight`/`set_weight` (ComfyUI's hooks for weights it cannot patch as stored) exist only while the
    weight is quantized.
    """

    quant_type: QuantType | None = None
    resident_weight_function: list = []
    adapters: list = []
    resident_adapters: list = []
    merge_requested: bool = False

    def hold_quantized(self, quant_type: QuantType) -> None:
        """Make the weight slot take `quant_type` blocks (a meta placeholder until the state dict is assigned)."""
        self.quant_type = quant_type
        shape = (self.out_features, quant_type.row_bytes(self.in_features))
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8, device="meta"), requires_grad=False)

    def dequantized_weight(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The weight as (out_features, in_features) floats on `device` (its blocks moved there first)."""
        assert self.quant_type is not None
        raw = self.weight.to(device, non_blocking=True)
        return dequantize(raw, self.quant_type, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_type is None:
            out = super().forward(x)
        else:
            if self.merge_requested:
                raise RuntimeError("A patch was merged into a GGUF layer where its per-call application was not "
                                   "wired up (e.g. ComfyUI's LoRA hooks); GGUF blocks take LoRAs from the LoRA "
                                   "loaders only (LoraLoaderModelOnly and the like).")
            w = self.dequantized_weight(x.device, x.dtype)
            for patch in self.weight_function or self.resident_weight_function:
                w = patch(w)
            b = self.bias
            if b is not None:
                b = b.to(device=x.device, dtype=x.dtype)
                for patch in self.bias_function:
                    b = patch(b)
            out = F.linear(x, w, b)
            if not self.weight_function:  # resident: ComfyUI's LoRAs here, if any, rather than in the weight
                for adapter in self.resident_adapters:
                    out = out + adapter(x)
        for adapter in self.adapters:
            out = out + adapter(x)
        return out

    # ComfyUI's hooks for weights not patchable as stored (comfy.model_patcher.get_key_weight looks them up).
    @property
    def convert_weight(self) -> Callable[..., torch.Tensor]:
        if self.quant_type is None:
            raise AttributeError("convert_weight")
        return self._convert_weight

    @property
    def set_weight(self) -> Callable[..., Any]:
        if self.quant_type is None:
            raise AttributeError("set_weight")
        return self._set_weight

    def _convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs: Any) -> torch.Tensor:
        """A weight as ComfyUI hands it over before patching -> float32 (out, in). A resident layer's weight
        comes as its block bytes cast to float32 (the byte shape, which no quantized type shares with the
        weight's own); a streamed layer's is already dequantized."""
        assert self.quant_type is not None
        if tuple(weight.shape) == tuple(self.weight.shape):
            return dequantize(weight.to(torch.uint8), self.quant_type, (self.out_features, self.in_features))
        return weight

    def _set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed: int | None = None,
                    return_weight: bool = False, **kwargs: Any) -> torch.Tensor | None:
        """The patched weight: returned as is when ComfyUI asks for it (a streamed layer's call); a merge into a
        resident layer only marks it (the host applies the patches at each call instead)."""
        if return_weight:
            return weight
        self.merge_requested = True
        return None


QuantizedOps = types.SimpleNamespace(
    Linear=QuantizedLinear,
    Conv2d=nn.Conv2d,
    LayerNorm=nn.LayerNorm,
    GroupNorm=nn.GroupNorm,
    Embedding=nn.Embedding,
)
def unfilled_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An Embedding whose (num_embeddings, dim) table is left unfilled, for models built on the meta device and
    then assigned their weights. nn.Embedding(...) itself draws normal values, which on the meta device goes
    through torch's reference ops and imports its compiler stack: seconds at every start, for nothing."""
    return nn.Embedding.from_pretrained(torch.empty(num_embeddings, dim), freeze=True)
