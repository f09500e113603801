"""The one exception type for model files a user can fix (wrong file, missing file, bad download)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .checkpoints.identify import FileKind


class ModelFileError(ValueError):
    """A model file is missing, damaged or of another model. The message says what to do.

    `found`: the kind of model the file holds, when it is the wrong one; `expected`: the kind the loader
    needed. The ComfyUI side uses them to add which folder each belongs in (model_loader knows no folders).
    """

    def __init__(self, message: str, *, found: FileKind | None = None, expected: FileKind | None = None) -> None:
        super().__init__(message)
        self.found = found
        self.expected = expected
