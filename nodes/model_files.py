"""A model name picked in a node -> found in its model folder and of the right kind, told from the header alone.

The nodes' VALIDATE_INPUTS run this before any weights are read (inside ComfyUI when a prompt is queued, and in
the command line's pre-flight), so a missing file, a name that leaves the model folder, a truncated download or
a file of another model is refused before minutes of loading.
"""
from __future__ import annotations

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
