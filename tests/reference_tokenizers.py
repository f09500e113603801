"""Where the real CLIP and T5 tokenizer files are: shared/tokenizers beside the checkout, or $KREA_TOKENIZERS.

CI has them there; elsewhere the tests that need them are skipped, except under CI, where a missing folder
is an error.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

TOKENIZERS = Path(os.environ.get("KREA_TOKENIZERS", Path(__file__).resolve().parents[2] / "shared" / "tokenizers"))
_PRESENT = (TOKENIZERS / "t5" / "tokenizer.json").is_file()
if os.environ.get("CI") and not _PRESENT:
    raise RuntimeError(f"reference tokenizer files missing under CI: {TOKENIZERS}")
needs_tokenizers = pytest.mark.skipif(not _PRESENT, reason="reference tokenizer files not available")
