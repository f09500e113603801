"""An independent measure of activation memory: every tensor the ops of a forward pass create, counted from
creation until its last reference dies, and the peak of that total inside each submodule.

The autoencoder's tiling planner estimates these peaks from the architecture (tiling.stage_elements); this
measures what the code really holds, op by op, so the estimate is checked against the modules it describes.
Scratch buffers inside a kernel (never returned to Python) are not seen, as the estimate does not count them.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the storages that op outputs keep alive; `open(name)` / `close(name)` bracket a peak."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # data pointer -> [bytes, tensors still referencing it]
        self.live = 0
        self.peaks: dict[str, int] = {}  # open brackets -> highest `live` seen since opened

    def open(self, name: str) -> None:
        self.peaks[name] = self.live

    def close(self, name: str) -> int:
        return self.peaks.pop(name)

    def _release(self, pointer: int) -> None:
        entry = self.storages[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[pointer]

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.storages:  # a new storage (views and in-place results share their input's)
            self.storages[pointer] = [storage.nbytes(), 0]
            self.live += storage.nbytes()
            for name, peak in self.peaks.items():
                self.peaks[name] = max(peak, self.live)
        self.storages[pointer][1] += 1
        weakref.finalize(tensor, self._release, pointer)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def module_peaks(net: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], int]:
    """({submodule name: peak live activation bytes while it ran}, peak of the whole pass) of net(x).

    `x` is copied inside the measure, so the pass's input counts as the caller holding it does.
    """
    meter = LiveTensorBytes()
    peaks: dict[str, int] = {}
    hooks = []
    for name, module in net.named_modules():
        if not name or isinstance(module, nn.ModuleList):
            continue
        hooks.append(module.register_forward_pre_hook(lambda _m, _a, name=name: meter.open(name)))
        hooks.append(module.register_forward_hook(
            lambda _m, _a, _o, name=name: peaks.__setitem__(name, meter.close(name))))
    try:
        with torch.no_grad(), meter:
            meter.open("")
            held = x.clone()
            out = net(held)
            del held, out
            total = meter.close("")
    finally:
        for hook in hooks:
            hook.remove()
    return peaks, total
