"""Named tensors -> a safetensors file, written atomically and tensor by tensor.

The one writer of the pack (random-weight fixtures, the demo, benchmarks): each tensor is made only when
it is written, so a 23.8 GB file needs the memory of its largest tensor, and the file appears under its
real name only once complete (a `.partial` file is written and renamed).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .reader import DTYPES

_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# (key, dtype, shape, make): `make()` returns the tensor (any dtype; it is converted) when it is written.
Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_safetensors(path: str | os.PathLike[str], entries: Sequence[Entry],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Stream `entries` into a safetensors file at `path` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for key, dtype, shape, _ in entries:
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for key, dtype, shape, make in entries:
                t = make().to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{key}: made shape {tuple(t.shape)}, declared {tuple(shape)}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write tensors already in memory (small fixtures) with the same atomic writer."""
    entries = [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]
    return write_safetensors(path, entries, metadata)
