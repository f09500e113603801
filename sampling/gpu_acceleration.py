"""GPU-only parts of `acceleration` regular/high: real fp8 matmuls and torch.compile of the blocks.

Both are switched on for one run and switched off after it, so `none` always runs the plain model.
Compiled forwards are kept across runs (compiling again on every run would cost more than it saves): one
per block class, shared by the 19 double and the 38 single blocks, since dynamo treats a block's weights
as inputs.
Wherever torch.compile does not work, the blocks fall back to eager execution with one warning.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

from ..model_loader.operations import CastLinear, fp8_matmul_supported

log = logging.getLogger(__name__)

# (block class, backend) -> compiled unbound forward, called as f(block, ...). It holds no block: a cache
# keyed by block whose compiled forwards were bound to it kept every block's weights alive after their
# model was replaced (on a GPU, the old model's 12-24 GB).
_compiled: dict[tuple[type, str], Callable] = {}
_compile_failed = False


def _compiled_forward(block_type: type, backend: str) -> Callable:
    key = (block_type, backend)
    if key not in _compiled:
        # dynamic=None (automatic dynamic shapes): the first size compiles a static graph, a second size
        # one graph with symbolic token counts that serves every later size. With dynamic=False each size
        # (and batch size) compiled anew and, past dynamo's recompile limit (8), ran uncompiled.
        _compiled[key] = torch.compile(block_type.forward, backend=backend, dynamic=None)
    return _compiled[key]


def _guarded(block: torch.nn.Module, compiled: Callable) -> Callable:
    """block's forward through `compiled(block, ...)`, or the eager one for good once compilation failed."""
    eager = type(block).forward

    def forward(*args, **kwargs):
        global _compile_failed
        if _compile_failed:
            return eager(block, *args, **kwargs)
        try:
            return compiled(block, *args, **kwargs)
        except Exception as err:  # torch.compile raises many kinds (backend, dynamo, inductor) at first call
            _compile_failed = True
            log.warning("torch.compile failed (%s: %s); acceleration continues without it.",
                        type(err).__name__, err)
            return eager(block, *args, **kwargs)

    return forward


@contextlib.contextmanager
def compiled_blocks(model: torch.nn.Module, backend: str = "inductor") -> Iterator[bool]:
    """Within the block the transformer blocks run compiled (yields False when compilation is off for good)."""
    blocks = [*model.double_blocks, *model.single_blocks]
    if _compile_failed or not hasattr(torch, "compile"):
        yield False
        return
    if any((type(block), backend) not in _compiled for block in blocks):
        log.info("torch.compile: compiling the transformer blocks; this run's first steps take longer.")
    for block in blocks:
        block.forward = _guarded(block, _compiled_forward(type(block), backend))
    try:
        yield True
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


@contextlib.contextmanager
def gpu_acceleration(model: torch.nn.Module, device: torch.device, compile_blocks: bool = True) -> Iterator[list[str]]:
    """Within the block: fp8 matmuls for fp8-stored weights (GPUs with fp8 units) and compiled blocks (CUDA).

    Yields the list of what was switched on, for the sampler's report. A no-op on the CPU.
    `compile_blocks` False: a model that is streamed layer by layer (partially loaded) runs eager, since its
    weights move between calls.
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
        if not compile_blocks:
            used.append("no torch.compile (the model is streamed)")
            yield used
            return
        with compiled_blocks(model) as compiled:
            if compiled:
                used.append("torch.compile")
            yield used
    finally:
        for layer in fp8_layers:
            layer.fast_fp8 = False
