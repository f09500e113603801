"""A path the user gave -> the safetensors files that make up one model (a `Checkpoint`), or one GGUF file.

The one place that decides which files are read: a file; a diffusers model root (its `subfolder`, e.g.
transformer/, vae/, text_encoder_2/); a folder of shards named by a `*.safetensors.index.json`; one shard of
such a folder (the whole folder); a folder with one weights file. Variant files that diffusers keeps beside
the main ones (`model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`, their `.index.fp16.json`)
are never mixed in: the main weights are preferred, a lone variant is used when it is all there is.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import ModelFileError
from .gguf_file import GGUFFile, is_gguf
from .reader import Checkpoint

_SHARD = re.compile(r"^(?P<stem>[^.]+?)(?P<variant>\.[^.-]+)?-\d{5}-of-\d{5}\.safetensors$")
_INDEX = re.compile(r"^[^.]+\.safetensors\.index(?P<variant>\.[^.]+)?\.json$")


def _variant(name: str) -> str:
    """'' for main weights files, '.fp16' for `model.fp16.safetensors` / `model.fp16-00001-of-00002...`."""
    shard = _SHARD.match(name)
    if shard:
        return shard["variant"] or ""
    stem = name[: -len(".safetensors")]
    return stem[stem.index("."):] if "." in stem else ""


def _sharded(folder: Path, index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelFileError(f"{index} is not a readable safetensors index.") from None
    absent = [f for f in files if not (folder / f).is_file()]
    if absent:
        raise ModelFileError(f"{folder} lacks {len(absent)} of the {len(files)} shards its index names "
                             f"({', '.join(absent[:3])}); download the missing files.")
    return Checkpoint(folder, [folder / f for f in files])


def _folder(folder: Path) -> Checkpoint:
    indexes = sorted(p for p in folder.iterdir() if _INDEX.match(p.name))
    main_indexes = [p for p in indexes if not _INDEX.match(p.name)["variant"]]
    if main_indexes or indexes:
        return _sharded(folder, (main_indexes or indexes)[0])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"The folder {folder} holds no .safetensors files.")
    variants = sorted({_variant(f.name) for f in files})
    chosen = "" if "" in variants else variants[0]
    if chosen and len(variants) > 1:
        raise ModelFileError(f"The folder {folder} holds only variant weights ({', '.join(variants)}); give the "
                             "file of the variant you want instead of the folder.")
    return Checkpoint(folder, [f for f in files if _variant(f.name) == chosen])


def open_checkpoint(path: str | os.PathLike[str], subfolder: str | None = None) -> Checkpoint | GGUFFile:
    """The model at `path`; `subfolder` is where a diffusers model root keeps it (e.g. "vae"). A GGUF file
    (told by its first bytes, whatever its name) is read as one."""
    path = Path(path)
    if subfolder and path.is_dir() and (path / subfolder).is_dir():
        path = path / subfolder
    if path.is_file():
        if is_gguf(path):
            return GGUFFile(path)
        if _SHARD.match(path.name) and any(_INDEX.match(p.name) for p in path.parent.iterdir()):
            return _folder(path.parent)
        return Checkpoint(path)
    if path.is_dir():
        return _folder(path)
    raise ModelFileError(f"Model file not found: {path}")
