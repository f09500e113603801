"""An interrupt check -> called before every transformer block, so a Cancel stops within one block, not one step.

The check (the host's: ComfyUI's throw_exception_if_processing_interrupted inside it) runs as a forward pre-hook
of each block while sampling and is removed afterwards: the blocks' math is untouched, and without a check
nothing is added at all.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def interrupt_between_blocks(model: torch.nn.Module, check: Callable[[], None] | None) -> Iterator[None]:
    """While inside, `check()` runs before each double and single block of `model` (it raises to stop)."""
    blocks = [*getattr(model, "double_blocks", ()), *getattr(model, "single_blocks", ())]
    if check is None or not blocks:
        yield
        return
    handles = [block.register_forward_pre_hook(lambda module, args: check()) for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
