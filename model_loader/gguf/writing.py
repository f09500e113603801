"""Named float tensors -> a GGUF file of chosen block types, written with the `gguf` package's own writer.

For fixtures (tests, the demo, benchmarks): each tensor is encoded (encode.py) as it is added, the file is
written under a `.partial` name and renamed once complete. Shapes are given in torch order; GGUF stores
them reversed, which gguf's writer does.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.gguf_file import import_gguf
from .encode import encode
from .types import QUANT_TYPES

# (name, make() -> the float tensor, block type name)
GGUFEntry = tuple[str, Callable[[], torch.Tensor], str]


def write_gguf(path: str | os.PathLike[str], entries: Iterable[GGUFEntry], arch: str,
               metadata: Mapping[str, str | int] | None = None) -> Path:
    """Write `entries` as a GGUF file of architecture `arch` (its folder is created)."""
    gguf = import_gguf()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    for name, make, type_name in entries:
        qtype = QUANT_TYPES[type_name]
        data = encode(make().to(torch.float32).numpy(), qtype, gguf)
        raw_dtype = None if qtype.name in ("F32", "F16") else gguf.GGMLQuantizationType[qtype.name]
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw_dtype)
    partial = path.with_name(path.name + ".partial")
    try:
        writer.write_header_to_file(path=partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
