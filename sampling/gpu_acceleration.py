"""GPU-only parts of `acceleration` regular/high: real fp8 matmuls and torch.compile of the blocks.

Both are switched on for one run and switched off after it, so `none` always runs the plain model.
Compiled forwards are kept across runs (compiling again on every run would cost more than it saves); the
19 double and 38 single blocks share one graph per kind, since dynamo treats a block's weights as inputs.
Wherever torch.compile does not work, the blocks fall back to eager execution with one warning.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator

import torch

from ..model_loader.operations import CastLinear, fp8_matmul_supported

log = logging.getLogger(__name__)

_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, Callable]" = weakref.WeakKeyDictionary()
_compile_failed = False


def _guarded(block: torch.nn.Module, compiled: Callable) -> Callable:
    """The compiled forward, or the eager one for good once compilation has failed anywhere."""
    eager = type(block).forward.__get__(block)

    def forward(*args, **kwargs):
        global _compile_failed
        if _compile_failed:
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # torch.compile raises many kinds (backend, dynamo, inductor) at first call
            _compile_failed = True
            log.warning("torch.compile failed (%s: %s); acceleration continues without it.",
                        type(err).__name__, err)
            return eager(*args, **kwargs)

    return forward


@contextlib.contextmanager
def compiled_blocks(model: torch.nn.Module, backend: str = "inductor") -> Iterator[bool]:
    """Within the block the transformer blocks run compiled (yields False when compilation is off for good)."""
    blocks = [*model.double_blocks, *model.single_blocks]
    if _compile_failed or not hasattr(torch, "compile"):
        yield False
        return
    for block in blocks:
        if block not in _compiled:
            # dynamic=None (automatic dynamic shapes): the first size compiles a static graph, a second size
            # one graph with symbolic token counts that serves every later size. With dynamic=False each size
            # (and batch size) compiled anew and, past dynamo's recompile limit (8), ran uncompiled.
            _compiled[block] = _guarded(block, torch.compile(type(block).forward.__get__(block), backend=backend,
                                                             dynamic=None))
        block.forward = _compiled[block]
    try:
        yield True
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


@contextlib.contextmanager
def gpu_acceleration(model: torch.nn.Module, device: torch.device) -> Iterator[list[str]]:
    """Within the block: fp8 matmuls for fp8-stored weights (GPUs with fp8 units) and compiled blocks (CUDA).

    Yields the list of what was switched on, for the sampler's report. A no-op on the CPU.
    """
    used: list[str] = []
    if device.type != "cuda":
        yield used
        return
    fp8_layers = [m for m in model.modules()
                  if isinstance(m, CastLinear) and m.weight.dtype == torch.float8_e4m3fn and not m.fast_fp8]
    if fp8_layers and fp8_matmul_supported(device):
        for layer in fp8_layers:
            layer.fast_fp8 = True
        used.append("fp8 matmul")
    try:
        with compiled_blocks(model) as compiled:
            if compiled:
                used.append("torch.compile")
            yield used
    finally:
        for layer in fp8_layers:
            layer.fast_fp8 = False
