"""Safetensors bytes -> named lazy tensors: zero-copy, memory-mapped reading of one file or of several shards.

Tensors returned here are views of a private (copy-on-write) memory map of the file: nothing is read
until a tensor is touched, and loading them with `load_state_dict(assign=True)` never holds a second
copy of the weights. The header is validated first so that a truncated download or a file of another
format gives a clear error instead of a crash deep inside torch.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ModelFileError

DTYPES: dict[str, torch.dtype] = {  # safetensors dtype name -> torch dtype
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of the data, from the start of the file
    end: int


class SafetensorsFile:
    """One safetensors file: its header on open, its tensors as memory-mapped views on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"Model file not found: {self.path}")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{self.path} is not a safetensors file (it is {size} bytes long).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= 1 or header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise ModelFileError(self._not_safetensors(size))
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFileError(self._not_safetensors(size)) from None
        if not isinstance(header, dict):
            raise ModelFileError(self._not_safetensors(size))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        data_end = data_start
        for name, entry in header.items():
            dtype, shape, begin, end = self._entry(name, entry)
            self.tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
            data_end = max(data_end, data_start + end)
        if data_end > size:
            raise ModelFileError(
                f"{self.path} is truncated: its header promises {data_end} bytes but the file has {size}. "
                "The download did not finish; download the file again."
            )
        self._map: mmap.mmap | None = None

    def _entry(self, name: str, entry: object) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of one header entry, checked: whole non-negative numbers, offsets in order
        and as many bytes as the shape and dtype need (a damaged header is refused here, not inside torch)."""
        def bad(why: str) -> ModelFileError:
            return ModelFileError(f"{self.path}: the header entry of tensor {name!r} is damaged ({why}); the file "
                                  "is corrupt or not a safetensors model. Download it again.")

        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            dtype_name = entry.get("dtype") if isinstance(entry, dict) else None
            raise bad(f"unknown dtype {dtype_name!r}" if isinstance(entry, dict) else "not an object")
        offsets, shape = entry.get("data_offsets"), entry.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)):
            raise bad(f"data_offsets {offsets!r} are not two whole numbers")
        if not (isinstance(shape, list) and all(_whole(d) for d in shape)):
            raise bad(f"shape {shape!r} is not a list of whole numbers")
        begin, end = offsets
        dtype = DTYPES[entry["dtype"]]
        count = 1
        for d in shape:
            count *= d
        if begin > end or end - begin != count * dtype.itemsize:
            raise bad(f"data_offsets {offsets} do not hold a {entry['dtype']} tensor of shape {shape}")
        return dtype, tuple(shape), begin, end

    def _not_safetensors(self, size: int) -> str:
        hint = ""
        if self.path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            hint = " Pickled checkpoints are not loaded; use the .safetensors release of the model."
        elif self.path.suffix.lower() == ".gguf":
            hint = " A .gguf file must start with GGUF's magic bytes; this one does not: download it again."
        return f"{self.path} is not a safetensors file ({size} bytes, no valid safetensors header).{hint}"

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def tensor(self, key: str) -> torch.Tensor:
        """A zero-copy view of one tensor (copy-on-write: writing to it never changes the file)."""
        info = self.tensors[key]
        count = 1
        for d in info.shape:
            count *= d
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.end - info.start, offset=info.start)
        return flat.view(info.dtype).reshape(info.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.tensors}


class TensorSource(Protocol):
    """What loaders read tensors from: a Checkpoint, a state dict, or weights made on demand."""
    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def tensor(self, key: str) -> torch.Tensor: ...


class StateDictSource:
    """A plain {key: tensor} mapping (meta tensors work: shapes only) seen as a TensorSource."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], path: str = "state dict") -> None:
        self._sd = state_dict
        self.path = path

    def keys(self) -> list[str]:
        return list(self._sd)

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._sd[key].dtype

    def tensor(self, key: str) -> torch.Tensor:
        return self._sd[key]


class RenamedSource:
    """A TensorSource seen under other names: `names` maps each name shown to the source's own name."""

    def __init__(self, source: TensorSource, names: Mapping[str, str]) -> None:
        self._source = source
        self._names = dict(names)
        self.path = getattr(source, "path", "state dict")

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(self._names[key])

    def dtype(self, key: str) -> torch.dtype:
        return self._source.dtype(self._names[key])

    def tensor(self, key: str) -> torch.Tensor:
        return self._source.tensor(self._names[key])

    def quant_type(self, key: str) -> object | None:
        """A GGUF source's block type of the tensor (None: not block-quantized, or not a GGUF source)."""
        quant_type = getattr(self._source, "quant_type", None)
        return quant_type(self._names[key]) if quant_type is not None else None

    def raw(self, key: str) -> torch.Tensor:
        return self._source.raw(self._names[key])


class Checkpoint:
    """One model stored in one or more safetensors files (shards): key -> lazy tensor.

    `path` is what the user gave (file or folder), for messages; `files` are the files read, as chosen by
    the resolver (resolver.py), which is the one place that decides which files make up a model.
    """

    def __init__(self, path: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]] | None = None) -> None:
        self.path = Path(path)
        if files is None:
            if not self.path.is_file():
                raise ModelFileError(f"Model file not found: {self.path}")
            files = [self.path]
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                self._where[k] = f
        self.metadata: dict[str, str] = {}
        for f in self.files:
            self.metadata.update(f.metadata)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].tensors[key].dtype

    def tensor(self, key: str) -> torch.Tensor:
        return self._where[key].tensor(key)

    def nbytes(self) -> int:
        return sum(i.end - i.start for f in self.files for i in f.tensors.values())


def file_identity(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """What tells one file from another (or from itself rewritten): its resolved path, size and modification time."""
    path = Path(path)
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
