"""FLUX transformer files -> a ready `FluxTransformer` module on a device, its weights held as `weight_dtype` asks.

The model is built on the meta device and its parameters are assigned from the memory-mapped file,
converted tensor by tensor only where the layout or `weight_dtype` asks for it, so loading never holds a
second copy of the weights. The config is read off the tensor shapes, so a reduced test file goes through
the same code as the full-size one. A GGUF file's block-quantized Linear weights stay as their bytes with
weight_dtype "default" (QuantizedLinear dequantizes them per call); the other weight_dtypes dequantize them
on load, tensor by tensor.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..checkpoints import StateDictSource, TensorSource, open_checkpoint
from ..compute_dtypes import flux_compute_dtype
from ..errors import ModelFileError
from ..operations import (
    FP8_DTYPES,
    CastLinear,
    OperationsFor,
    QuantizedLinear,
    WeightStorage,
    cast_operations,
    fp8_matmul_supported,
    quantize_fp8,
)
from .layouts import FluxLayout, config_from_shapes, plan_flux_layout
from .model import FluxConfig, FluxTransformer

log = logging.getLogger(__name__)

WEIGHT_DTYPES = ("default", "bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_fast")
_SCALE_SUFFIXES = (".scale_weight", ".scale_input")
# file dtype -> the dtype weight_dtype "default" stores it in (the host's choice inside ComfyUI)
DefaultDtype = Callable[[torch.dtype], torch.dtype]


def config_from_checkpoint(ckpt: TensorSource | Mapping[str, Tensor] | str | os.PathLike[str]) -> FluxConfig:
    """The FluxConfig of a checkpoint (a path, a TensorSource, or a state dict) in any accepted layout."""
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = open_checkpoint(ckpt, "transformer")
    elif isinstance(ckpt, Mapping):
        ckpt = StateDictSource(ckpt)
    name = str(getattr(ckpt, "path", "checkpoint"))
    layout = plan_flux_layout(ckpt, name)
    return config_from_shapes({k: p.shape for k, p in layout.tensors.items()}, name)


def _check_weight_dtype(weight_dtype: str) -> None:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"Unknown weight_dtype {weight_dtype!r}; choose one of: {', '.join(WEIGHT_DTYPES)}.")


def _dequantize(t: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    if scale is None:
        return t.to(dtype)
    return (t.to(torch.float32) * scale.to(t.device, torch.float32)).to(dtype)


def _convert(key: str, t: Tensor, scale: Tensor | None, weight_dtype: str, linear_weights: set[str],
             default_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
    """One tensor as `weight_dtype` stores it: (tensor, per-tensor scale for CastLinear or None).
    `default_dtype`: what "default" stores non-fp8 tensors in (None: as the file does)."""
    is_linear = key in linear_weights
    if weight_dtype == "default":
        if is_linear and t.dtype in FP8_DTYPES:
            return t, scale
        if t.dtype in FP8_DTYPES:
            return _dequantize(t, scale, torch.bfloat16), None
        if default_dtype is not None and t.dtype != default_dtype:
            return _dequantize(t, scale, default_dtype), None
        return (t, None) if scale is None else (_dequantize(t, scale, t.dtype), None)
    if weight_dtype in ("bf16", "fp16"):
        return _dequantize(t, scale, torch.bfloat16 if weight_dtype == "bf16" else torch.float16), None
    # fp8 storage: the big Linear weights of the blocks in fp8, everything small in bf16.
    if is_linear and key.startswith(("double_blocks.", "single_blocks.")):
        if t.dtype == torch.float8_e4m3fn:
            return t, scale
        return quantize_fp8(_dequantize(t, scale, torch.float32) if scale is not None else t)
    return _dequantize(t, scale, torch.bfloat16), None


def load_flux_from_source(source: TensorSource, weight_dtype: str = "default", device: str | torch.device = "cpu",
                          name: str = "state dict", compute_device: str | torch.device | None = None,
                          operations: OperationsFor = cast_operations,
                          default_dtype: DefaultDtype | None = None) -> FluxTransformer:
    """Build a FluxTransformer from any TensorSource (a Checkpoint, or a StateDictSource of possibly meta tensors).

    Weights go to `device`; the model will compute on `compute_device` (default: `device`; inside ComfyUI
    they differ: weights on the offload device, compute on the GPU). `operations` picks the layer classes
    for the storage: the pack's own by default, ComfyUI's inside it. `default_dtype(file dtype)`: what
    `weight_dtype` "default" stores a non-fp8 file in (None: as stored; inside ComfyUI: ComfyUI's own
    choice for the device and its --*-unet flags).
    """
    _check_weight_dtype(weight_dtype)
    device = torch.device(device)
    compute_device = device if compute_device is None else torch.device(compute_device)
    layout = plan_flux_layout(source, name)
    config = config_from_shapes({k: p.shape for k, p in layout.tensors.items()}, name)
    storage = _storage(layout, weight_dtype, compute_device, default_dtype)
    # "default" keeps each tensor's own dtype unless the host chose one (ComfyUI: its own choice for the device).
    chosen = (weight_dtype == "default" and default_dtype is not None and storage.dtype not in FP8_DTYPES
              and not storage.quantized)
    target = storage.dtype if chosen else None
    try:
        model = FluxTransformer(config, device="meta", operations=operations(storage))
    except ValueError as err:
        raise ModelFileError(f"{name}: its shapes give an impossible FLUX config ({err}).") from None
    # Per-tensor scales that the layer classes keep as state (ComfyUI's scaled-fp8 layers): not file tensors.
    scale_keys = {k for k in model.state_dict() if k.endswith(_SCALE_SUFFIXES)}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in scale_keys}
    _check_keys(name, layout, expected)
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = dict(model.named_modules())
    state: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    for key, planned in layout.tensors.items():  # tensor by tensor: at most one converted tensor in flight
        if storage.quantized and planned.raw is not None and planned.quant is not None and key in linear_weights:
            module = modules[key[: -len(".weight")]]
            if not isinstance(module, QuantizedLinear):
                raise TypeError(f"operations gave {type(module).__name__} for the GGUF weight {key}; quantized "
                                "storage needs QuantizedLinear layers.")
            module.hold_quantized(planned.quant)
            state[key] = planned.raw().to(device)
            continue
        t = planned.read().to(device)
        scale = planned.scale().to(device, torch.float32) if planned.scale is not None else None
        state[key], scale = _convert(key, t, scale, weight_dtype, linear_weights, target)
        if scale is not None:
            scales[key[: -len(".weight")]] = scale.reshape(())
    for key in scale_keys:  # a layer without a stored scale has scale 1
        module_name = key.rsplit(".", 1)[0]
        is_weight_scale = key.endswith(".scale_weight") and module_name in scales
        state[key] = scales.pop(module_name) if is_weight_scale else torch.ones((), device=device)
    model.requires_grad_(False)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    for module_name, scale in scales.items():
        modules[module_name].set_scale(scale)
    if weight_dtype == "fp8_e4m3fn_fast":
        if fp8_matmul_supported(compute_device):
            for module in modules.values():
                if isinstance(module, CastLinear):
                    module.fast_fp8 = True
        else:
            log.warning("fp8_e4m3fn_fast: %s has no fp8 matrix units; multiplying in bf16 (as fp8_e4m3fn).",
                        compute_device)
    model.storage_dtype = storage.dtype
    model.compute_dtype = storage.compute_dtype
    model.eval()
    held = "GGUF blocks" if storage.quantized else weight_dtype
    log.info("Loaded FLUX transformer %s (%s layout, %d double + %d single blocks, weights %s, compute %s)",
             name, layout.kind, config.depth, config.depth_single_blocks, held, model.compute_dtype)
    return model


def _storage(layout: FluxLayout, weight_dtype: str, compute_device: torch.device,
             default_dtype: DefaultDtype | None) -> WeightStorage:
    """How the loaded blocks will hold their weights, known from the plan before anything is read."""
    probe = next(p for k, p in layout.tensors.items() if k.startswith(("double_blocks.", "single_blocks."))
                 and k.endswith(".weight") and len(p.shape) == 2)
    if weight_dtype == "default" and probe.quant is not None:  # GGUF blocks, kept as stored
        return WeightStorage(dtype=torch.uint8, compute_dtype=flux_compute_dtype(compute_device, weight_dtype,
                                                                                 torch.bfloat16),
                             scaled=False, fast_fp8=False, quantized=True)
    stored = {"default": probe.dtype, "bf16": torch.bfloat16, "fp16": torch.float16}.get(weight_dtype,
                                                                                       torch.float8_e4m3fn)
    if weight_dtype == "default" and stored not in FP8_DTYPES and default_dtype is not None:
        stored = default_dtype(stored)
    if weight_dtype == "default" and stored in FP8_DTYPES:
        scaled = probe.scale is not None
    else:
        scaled = stored in FP8_DTYPES  # fp8 storage made on load is per-tensor scaled
    return WeightStorage(dtype=stored, compute_dtype=flux_compute_dtype(compute_device, weight_dtype, stored),
                         scaled=scaled, fast_fp8=weight_dtype == "fp8_e4m3fn_fast")


def _check_keys(name: str, layout: FluxLayout, expected: Mapping[str, tuple[int, ...]]) -> None:
    found = {k: p.shape for k, p in layout.tensors.items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} tensors a FLUX.1 transformer does not have (e.g. {', '.join(extra[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise ModelFileError(f"{name} does not match the FLUX.1 transformer its shapes describe: "
                             f"{'; '.join(problems)}. The file is incomplete, damaged or of a FLUX variant this "
                             "loader does not support.")


def load_flux(path: str | os.PathLike[str], weight_dtype: str = "default", device: str | torch.device = "cpu",
              compute_device: str | torch.device | None = None,
              operations: OperationsFor = cast_operations,
              default_dtype: DefaultDtype | None = None) -> FluxTransformer:
    """Load a FLUX.1 transformer (any accepted layout) as an eval-mode FluxTransformer with frozen weights.

    weight_dtype: "default" (as stored; fp8 stays fp8 and computes in bf16), "bf16", "fp16",
    "fp8_e4m3fn" (block Linear weights in fp8, the rest bf16; computes in bf16) or "fp8_e4m3fn_fast"
    (the same, multiplying in fp8 on GPUs that can). `model.compute_dtype` is the dtype to feed it on
    `compute_device`, `model.storage_dtype` how its blocks' weights are held.
    """
    _check_weight_dtype(weight_dtype)
    checkpoint = open_checkpoint(path, "transformer")
    return load_flux_from_source(checkpoint, weight_dtype, device, str(checkpoint.path), compute_device, operations,
                                 default_dtype)
