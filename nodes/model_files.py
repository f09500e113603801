"""A model name picked in a node -> found in its model folder and of the right kind, told from the header alone;
and a model folder's files -> the first of a kind (a new node's default).

The nodes' VALIDATE_INPUTS run this before any weights are read (inside ComfyUI when a prompt is queued, and in
the command line's pre-flight), so a missing file, a name that leaves the model folder, a truncated download or
a file of another model is refused before minutes of loading. The defaults are read on every INPUT_TYPES call,
so the kind of each file is remembered by path, size and modification time.
"""
from __future__ import annotations

import functools
from pathlib import Path

from ..model_loader import FileKind, ModelFileError, identify, open_checkpoint
from .host import host, with_folders

# What each model input accepts (a full checkpoint bundles the part too; the loader then reads that part).
TRANSFORMER = frozenset({FileKind.FLUX_TRANSFORMER, FileKind.BUNDLE})
CLIP = frozenset({FileKind.CLIP_TEXT, FileKind.BUNDLE})
T5 = frozenset({FileKind.T5_TEXT, FileKind.BUNDLE})
VAE = frozenset({FileKind.VAE, FileKind.BUNDLE})
CLASSIFIER = frozenset({FileKind.VIT_CLASSIFIER})


def check_model_file(folder: str, name: str, kinds: frozenset[FileKind], input_name: str) -> None:
    """Raise ModelFileError unless `name` is a file in the `folder` model folders whose header holds one of
    `kinds`; the message names the input, what the file is, and where it belongs."""
    try:
        path = host.model_path(folder, name)
    except ModelFileError as err:
        raise ModelFileError(f"{input_name}: {err}") from None
    try:
        kind = identify(open_checkpoint(path).keys())
    except ModelFileError as err:
        raise ModelFileError(f"{input_name}: {err}") from None
    except OSError as err:
        raise ModelFileError(f"{input_name}: cannot read {name!r} in the {folder!r} folder: "
                             f"{err.strerror or err}. Check the file's permissions.") from None
    if kind not in kinds:
        expected = sorted(kinds - {FileKind.BUNDLE}, key=lambda k: k.name)[0]
        raise with_folders(ModelFileError(
            f"{input_name}: {name!r} is {kind.description}, not {expected.description}; pick the right file.",
            found=kind, expected=expected))


def model_file_problems(checks: list[tuple[str, str | None, frozenset[FileKind], str]]) -> list[str]:
    """The problems of several (folder, name, kinds, input name) at once, each starting with its input's name; a
    None name (a linked input, known only at run time) is skipped."""
    problems = []
    for folder, name, kinds, input_name in checks:
        if name is None:
            continue
        try:
            check_model_file(folder, name, kinds, input_name)
        except ModelFileError as err:
            problems.append(str(err))
    return problems


@functools.lru_cache(maxsize=1024)
def _kind_of(path: str, size: int, mtime_ns: int) -> FileKind | None:
    """What the file holds, from its header (None: not a readable model file). Size and mtime are the cache key."""
    try:
        return identify(open_checkpoint(path).keys())
    except (ModelFileError, OSError):
        return None


def first_of_kind(folder: str, names: list[str], kinds: frozenset[FileKind]) -> str | None:
    """The first of `names` (files of the `folder` model folders) that holds one of `kinds` itself (not inside a
    full checkpoint), e.g. the T5 file of a folder that lists clip_l.safetensors first; None when none does."""
    wanted = kinds - {FileKind.BUNDLE}
    for name in names:
        path = host.find_model(folder, name)
        if path is None:
            continue
        try:
            stat = Path(path).stat()
        except OSError:
            continue
        if _kind_of(str(path), stat.st_size, stat.st_mtime_ns) in wanted:
            return name
    return None
