"""A GGUF file -> named lazy tensors: its metadata, its tensor table, and each tensor as a view of the file.

Read with the format's own library (`gguf`, an optional dependency: `pip install gguf`; ComfyUI-GGUF installs
it too) through a copy-on-write memory map: nothing is read until a tensor is touched, and a quantized tensor
stays in its bytes (`raw`) until a layer dequantizes it. GGUF stores dimensions innermost first; shapes here
are torch's (reversed), or the `comfy.gguf.orig_shape.<name>` array ComfyUI-GGUF's converter writes for
tensors it reshaped. Every tensor type is checked on open: a type the pack does not read is refused by name
before anything else happens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError
from ..gguf.dequantize import dequantize
from ..gguf.types import SUPPORTED_NAMES, QuantType, quant_type

GGUF_MAGIC = b"GGUF"
ORIG_SHAPE = "comfy.gguf.orig_shape."  # ComfyUI-GGUF: the torch shape of a tensor stored reshaped
INSTALL_HINT = ('Reading GGUF files needs the `gguf` package: pip install gguf (or pip install '
                '"comfyui-krea[gguf]"); inside ComfyUI, installing ComfyUI-GGUF brings it too.')


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with GGUF's magic bytes (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ModelFileError(INSTALL_HINT) from None
    return gguf


@dataclass(frozen=True)
class GGUFTensor:
    qtype: QuantType
    shape: tuple[int, ...]  # torch order
    data: Any  # numpy view of the file: the dense values, or (..., row_bytes) uint8 blocks


class GGUFFile:
    """One GGUF file as a TensorSource. `tensor(key)` gives float values (quantized tensors dequantized to
    float32); `quant_type(key)` and `raw(key)` give a quantized tensor as stored, for layers that keep it so."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"Model file not found: {self.path}")
        gguf = import_gguf()
        size = self.path.stat().st_size
        try:
            reader = gguf.GGUFReader(self.path, "c")
        except (ValueError, IndexError, KeyError, TypeError, OverflowError) as err:
            raise ModelFileError(f"{self.path} is not a readable GGUF file ({size} bytes; {err}). The download may "
                                 "be incomplete or damaged: download it again.") from None
        self.metadata: dict[str, Any] = {}
        orig_shapes: dict[str, tuple[int, ...]] = {}
        for name, field in reader.fields.items():
            value = _field_value(gguf, field)
            if name.startswith(ORIG_SHAPE):
                orig_shapes[name[len(ORIG_SHAPE):]] = tuple(int(d) for d in value)
            else:
                self.metadata[name] = value
        self.architecture: str | None = self.metadata.get("general.architecture")
        self.tensors: dict[str, GGUFTensor] = {}
        refused: dict[str, list[str]] = {}
        end = 0
        for t in reader.tensors:
            type_name = getattr(t.tensor_type, "name", str(t.tensor_type))
            try:
                qtype = quant_type(int(t.tensor_type), type_name)
            except ValueError:
                refused.setdefault(type_name, []).append(t.name)
                continue
            shape = orig_shapes.get(t.name, tuple(int(d) for d in reversed(t.shape.tolist())))
            self.tensors[t.name] = GGUFTensor(qtype, shape, t.data)
            end = max(end, t.data_offset + t.n_bytes)
        if refused:
            listed = "; ".join(f"{name} ({len(keys)} tensors, e.g. {keys[0]})" for name, keys in refused.items())
            raise ModelFileError(f"{self.path} stores tensors in GGUF types this loader does not read: {listed}. "
                                 f"Supported: {SUPPORTED_NAMES}; use a file quantized to one of them.")
        if end > size:
            raise ModelFileError(f"{self.path} is truncated: its tensor table needs {end} bytes but the file has "
                                 f"{size}. Download the file again.")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        """The dtype `tensor(key)` returns: the stored float dtype, float32 for quantized tensors."""
        return self.tensors[key].qtype.dense or torch.float32

    def quant_type(self, key: str) -> QuantType | None:
        """The block type of a quantized tensor; None for the plain float types."""
        qtype = self.tensors[key].qtype
        return qtype if qtype.quantized else None

    def raw(self, key: str) -> torch.Tensor:
        """A quantized tensor as stored: uint8 (rows..., row_bytes), a zero-copy view of the file."""
        return torch.from_numpy(self.tensors[key].data)

    def tensor(self, key: str) -> torch.Tensor:
        """The values of one tensor in torch's shape: a view of the file for the float types, dequantized
        (float32, a new tensor) for the quantized ones."""
        entry = self.tensors[key]
        data = torch.from_numpy(entry.data)
        if entry.qtype.dense == torch.bfloat16:  # stored as bytes: numpy has no bfloat16
            data = data.view(torch.bfloat16)
        if entry.qtype.dense is not None:
            return data.reshape(entry.shape)
        return dequantize(data, entry.qtype, entry.shape)

    def nbytes(self) -> int:
        return sum(int(t.data.nbytes) for t in self.tensors.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.tensors}


def _field_value(gguf: Any, field: Any) -> Any:
    """A metadata field as a Python value (a string, a number, or a list of them)."""
    types = field.types
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[-1]]).decode("utf-8", "replace")
    return field.parts[field.data[-1]].tolist()[0]
