"""Gaps in the runner's tests that mutation testing (bench/mutation.py --package runner) found: the runner is generic
over node classes, so these use small node classes of their own and check the documented contract."""
from __future__ import annotations

from pathlib import Path

import pytest

from comfyui_krea.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_krea.standalone.runner import LoadImage, run, validate
from comfyui_krea.standalone.ui_workflow import local_definitions, to_api

ROOT = Path(__file__).resolve().parent.parent
CALLS: list[str] = []


class Source:
    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"optional": {"start": ("INT", {"default": 1, "min": 0, "max": 9})}}  # no "required" at all

    def make(self, start: int = 1) -> tuple[int]:
        CALLS.append("Source")
        return (start,)


class Double:
    RETURN_TYPES = ("INT",)
    FUNCTION = "double"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"x": ("INT", {})}}

    def double(self, x: int) -> tuple[int]:
        CALLS.append("Double")
        return (2 * x,)


class Sink:
    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"a": ("INT", {}), "b": ("INT", {})}}

    def show(self, a: int, b: int) -> dict:
        CALLS.append("Sink")
        return {"ui": {"sum": [a + b]}}


CLASSES = {"Source": Source, "Double": Double, "Sink": Sink}


def test_a_node_two_others_read_runs_once_and_each_start_is_told():
    """Source feeds both Doubles (a diamond): it runs once, before them; on_node hears every node as it starts."""
    CALLS.clear()
    prompt = {"s": {"class_type": "Source"},  # no "inputs" at all: nothing required
              "d1": {"class_type": "Double", "inputs": {"x": ["s", 0]}},
              "d2": {"class_type": "Double", "inputs": {"x": ["s", 0]}},
              "out": {"class_type": "Sink", "inputs": {"a": ["d1", 0], "b": ["d2", 0]}}}
    started = []
    uis = run(prompt, CLASSES, on_node=lambda node_id, kind: started.append((node_id, kind)))
    assert uis == {"out": {"sum": [4]}}
    assert CALLS == ["Source", "Double", "Double", "Sink"]
    assert started == [("s", "Source"), ("d1", "Double"), ("d2", "Double"), ("out", "Sink")]


def test_every_problem_is_reported_and_odd_nodes_do_not_crash_validation():
    prompt = {"1": "not a node", "2": {"class_type": "Nope"}, "3": {"class_type": "Double"},
              "4": {"class_type": "Source", "inputs": {"start": 99}}}
    problems = validate(prompt, CLASSES)
    assert any(p.startswith("node 1:") for p in problems)
    assert any(p.startswith("node 2:") and "unknown node type" in p for p in problems)
    assert "node 3 (Double): required input 'x' is missing" in problems  # after the unknown node: all are checked
    assert any(p.startswith("node 4 (Source): start: 99 is bigger") for p in problems)


def test_load_image_takes_a_linked_image_and_names_a_missing_file(tmp_path):
    # A linked input reaches VALIDATE_INPUTS as None: it is checked when the node runs.
    assert LoadImage.VALIDATE_INPUTS(image=None) is True
    with pytest.raises(ValueError, match="not found"):
        LoadImage().load_image(str(tmp_path / "missing.png"))


def test_the_runner_s_own_load_image_converts_from_the_ui_format():
    """Without a server, the pack's classes (with the runner's LoadImage) are the definitions: the image-to-image
    file's LoadImage widget is read as the `image` input."""
    import json

    definitions = local_definitions({**NODE_CLASS_MAPPINGS, "LoadImage": LoadImage}, NODE_DISPLAY_NAME_MAPPINGS)
    ui = json.loads((ROOT / "workflows" / "krea_image_to_image.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / "krea_image_to_image.json").read_text())
    assert to_api(ui, definitions)["7"]["inputs"] == api["7"]["inputs"] == {"image": "example.png"}
