"""web/krea_badges.js, run by Node.js: where the report badges go under a node. Short badges sit side by side and
wrap to the next row; a long one (a warning) gets rows of its own with its words wrapped, so none is cut off at
any node width. The measure is a fixed width per character, as a monospaced canvas font would give."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

MODULE = (Path(__file__).resolve().parent.parent / "web" / "krea_badges.js").as_uri()
NODE = shutil.which("node")
CHAR = 6  # pixels per character

pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the frontend module")

WARNING = "⚠ step caching needs the Krea transformer (Krea Model Loader); this model ran every step"


def layout(badges: list[dict], width: int) -> list[dict]:
    code = (f"const m = await import({json.dumps(MODULE)});"
            f"console.log(JSON.stringify(m.layoutBadges({json.dumps(badges)}, {width}, (t) => t.length * {CHAR})));")
    done = subprocess.run([NODE, "--input-type=module", "-e", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def badge(text: str, tone: str = "info") -> dict:
    return {"text": text, "tone": tone}


@pytest.mark.parametrize("width", [60, 120, 200, 320])
def test_every_word_is_shown_inside_the_node_at_any_width(width):
    texts = ["28 steps", "20 computed", WARNING, "3.21 s"]
    placed = layout([badge(text) for text in texts], width)
    assert ["".join(p["lines"]).replace(" ", "") for p in placed] == [text.replace(" ", "") for text in texts]
    for p in placed:
        assert 0 <= p["x"] and p["x"] + p["width"] <= width  # nothing reaches past the node
        assert all(len(line) * CHAR + 12 <= p["width"] for line in p["lines"])  # every line inside its badge


def test_short_badges_share_a_row_and_wrap_to_the_next():
    placed = layout([badge("a" * 10), badge("b" * 10), badge("c" * 10)], 160)  # 72 px each, 4 px apart
    assert [(p["x"], p["y"]) for p in placed] == [(0, 0), (76, 0), (0, 22)]
    assert all(p["lines"] == [p["lines"][0]] and p["height"] == 18 for p in placed)


def test_a_long_badge_has_rows_of_its_own_and_the_next_starts_below_it():
    placed = layout([badge("28 steps"), badge(WARNING, "warn"), badge("3.21 s")], 120)
    first, warning, last = placed
    assert warning["x"] == 0 and warning["y"] == first["y"] + 18 + 4
    assert len(warning["lines"]) > 1 and all(len(line) * CHAR <= 120 - 12 for line in warning["lines"])
    assert warning["height"] == len(warning["lines"]) * 14 + 4
    assert last["x"] == 0 and last["y"] == warning["y"] + warning["height"] + 4


def test_a_word_wider_than_the_node_is_cut_between_characters():
    (placed,) = layout([badge("x" * 50)], 100)  # 300 px of text, 88 px of room
    assert "".join(placed["lines"]) == "x" * 50 and all(len(line) * CHAR <= 88 for line in placed["lines"])
