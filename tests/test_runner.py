"""The API-workflow runner (standalone/runner.py), each check pinned by a test that fails without it: every check of
`validate` (unknown node type, missing required input, link to a missing node, not a number, not an integer, min,
max, combo list, boolean, string, the VALIDATE_INPUTS result and the inputs it alone checks, a linked input given
as None), every problem reported at once, "no output node" and the cycle check of the ordering; run order and
inputs (a node two others read runs once, each start is told). Toy node classes keep these exact and fast; a few
checks run on the pack's own nodes too, and the runner's LoadImage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_krea.nodes import NODE_DISPLAY_NAME_MAPPINGS
from comfyui_krea.nodes.host import host
from comfyui_krea.standalone.node_classes import PACK_CLASSES, LoadImage
from comfyui_krea.standalone.runner import WorkflowError, run, validate
from comfyui_krea.standalone.ui_workflow import local_definitions, to_api

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"


# ---------------------------------------------------------------------------------------- toy nodes for the runner

RAN: list[str] = []  # class names of the nodes run, in order (cleared by the `ran` fixture)


class Constant:
    """One input of every kind the runner checks."""
    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "count": ("INT", {"min": 0, "max": 10}),
                "scale": ("FLOAT", {"min": 0.5, "max": 2.0}),
                "mode": (["add", "keep"],),
                "flag": ("BOOLEAN", {"default": True}),
                "text": ("STRING", {"multiline": True}),
            },
            "optional": {"extra": ("INT", {"min": 0})},
        }

    def make(self, count, scale, mode, flag, text, extra=0):
        RAN.append("Constant")
        return (count + extra,)


class Add:
    RETURN_TYPES = ("INT",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"a": ("INT",), "b": ("INT",)}}

    def add(self, a, b):
        RAN.append("Add")
        return (a + b,)


class Even:
    """VALIDATE_INPUTS takes `size`: it alone checks it (ComfyUI then skips its own min/max for that input)."""
    RETURN_TYPES = ("INT",)
    FUNCTION = "pass_on"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"size": ("INT", {"min": 0, "max": 100})}}

    @classmethod
    def VALIDATE_INPUTS(cls, size) -> bool | str:
        return True if size % 2 == 0 else f"size must be even, got {size}"

    def pass_on(self, size):
        RAN.append("Even")
        return (size,)


class Show:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"value": ("INT",)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "node_id": "UNIQUE_ID"}}

    def show(self, value, prompt=None, extra_pnginfo=None, node_id=None):
        RAN.append("Show")
        return {"ui": {"value": [value], "node_id": [node_id], "nodes": sorted(prompt),
                       "extra": [extra_pnginfo]}}


TOYS = {"Constant": Constant, "Add": Add, "Even": Even, "Show": Show}


def constant(count=2, **inputs) -> dict:
    return {"class_type": "Constant",
            "inputs": {"count": count, "scale": 1.0, "mode": "add", "flag": True, "text": "t", **inputs}}


def toy_workflow() -> dict:
    """Show(Add(Constant 2, Even 4)), plus a Constant no output needs."""
    return {
        "1": constant(2),
        "2": {"class_type": "Even", "inputs": {"size": 4}},
        "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
        "5": constant(9),
    }


@pytest.fixture
def ran():
    RAN.clear()
    yield RAN
    RAN.clear()


def test_a_valid_toy_workflow_runs_in_dependency_order(ran):
    prompt = toy_workflow()
    assert validate(prompt, TOYS) == []
    uis = run(prompt, TOYS, extra_pnginfo={"workflow": "w"})
    assert uis == {"4": {"value": [6], "node_id": ["4"], "nodes": ["1", "2", "3", "4", "5"],
                         "extra": [{"workflow": "w"}]}}
    # Node 5 feeds no output node: it does not run. Every node runs after the nodes it reads from.
    assert sorted(ran[:2]) == ["Constant", "Even"] and ran[2:] == ["Add", "Show"]


def test_optional_inputs_may_be_left_out_and_are_passed_when_given(ran):
    prompt = toy_workflow()
    prompt["1"]["inputs"]["extra"] = 3
    assert run(prompt, TOYS)["4"]["value"] == [9]
    del prompt["1"]["inputs"]["extra"]
    assert validate(prompt, TOYS) == []


def test_inputs_a_node_does_not_declare_are_not_passed(ran):
    prompt = toy_workflow()
    prompt["3"]["inputs"]["stale"] = 5  # e.g. left over from an older version of the node
    assert run(prompt, TOYS)["4"]["value"] == [6]


@pytest.mark.parametrize("node_id,change,message", [
    ("1", {"class_type": "Nope"}, "node 1: unknown node type 'Nope'"),
    ("1", {"inputs": {"count": 1, "scale": 1.0, "mode": "add", "flag": True}},
     "node 1 (Constant): required input 'text' is missing"),
    ("3", {"inputs": {"a": ["1", 0]}}, "node 3 (Add): required input 'b' is missing"),
    ("3", {"inputs": {"a": ["1", 0], "b": ["99", 0]}},
     "node 3 (Add): b is linked to node 99, which is not in the workflow"),
    ("1", constant("3"), "node 1 (Constant): count: '3' is not a number"),
    ("1", constant(True), "node 1 (Constant): count: True is not a number"),
    ("1", constant(scale="big"), "node 1 (Constant): scale: 'big' is not a number"),
    ("1", constant(2.5), "node 1 (Constant): count: 2.5 is not an integer"),
    ("1", constant(-1), "node 1 (Constant): count: -1 is smaller than the minimum 0"),
    ("1", constant(scale=0.25), "node 1 (Constant): scale: 0.25 is smaller than the minimum 0.5"),
    ("1", constant(11), "node 1 (Constant): count: 11 is bigger than the maximum 10"),
    ("1", constant(scale=2.5), "node 1 (Constant): scale: 2.5 is bigger than the maximum 2.0"),
    ("1", constant(extra=-2), "node 1 (Constant): extra: -2 is smaller than the minimum 0"),
    ("1", constant(mode="double"), "node 1 (Constant): mode: 'double' is not one of ['add', 'keep']"),
    ("1", constant(flag="true"), "node 1 (Constant): flag: 'true' is not a boolean"),
    ("1", constant(flag=1), "node 1 (Constant): flag: 1 is not a boolean"),
    ("1", constant(text=5), "node 1 (Constant): text: 5 is not a string"),
    ("2", {"inputs": {"size": 3}}, "node 2 (Even): size must be even, got 3"),
], ids=["unknown-type", "missing-required", "missing-required-link", "link-to-missing-node", "string-as-number",
        "bool-as-number", "string-as-float", "not-an-integer", "min-int", "min-float", "max-int", "max-float",
        "min-optional", "combo", "string-as-boolean", "int-as-boolean", "not-a-string", "validate-inputs"])
def test_each_problem_is_reported_and_nothing_runs(ran, node_id, change, message):
    prompt = toy_workflow()
    prompt[node_id] = {**prompt[node_id], **change}
    problems = validate(prompt, TOYS)
    assert len(problems) == 1 and problems[0].startswith(message), problems
    with pytest.raises(WorkflowError, match="the workflow cannot run") as err:
        run(prompt, TOYS)
    assert message in str(err.value)
    assert ran == []  # refused before any node ran


def test_every_problem_is_listed_at_once():
    prompt = toy_workflow()
    prompt["1"] = constant(11, mode="double")
    prompt["2"]["inputs"]["size"] = 5
    prompt["5"] = {"class_type": "Nope", "inputs": {}}
    assert len(validate(prompt, TOYS)) == 4


def test_inputs_that_validate_inputs_takes_skip_the_generic_checks(ran):
    # Even.VALIDATE_INPUTS takes size: as in ComfyUI, its max of 100 is then not checked by the runner.
    prompt = toy_workflow()
    prompt["2"]["inputs"]["size"] = 1000
    assert validate(prompt, TOYS) == []
    assert run(prompt, TOYS)["4"]["value"] == [1002]


def test_a_workflow_without_an_output_node_is_refused(ran):
    prompt = {"1": constant(2), "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}}}
    assert validate(prompt, TOYS) == []
    with pytest.raises(WorkflowError, match="no output node"):
        run(prompt, TOYS)
    assert ran == []


def test_a_cycle_is_refused_with_the_node_named(ran):
    prompt = {
        "1": constant(2),
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["3", 0]}},
        "3": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["1", 0]}},
        "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
    }
    assert validate(prompt, TOYS) == []  # every link points at a node of the workflow
    with pytest.raises(WorkflowError, match="cycle through node [23]"):
        run(prompt, TOYS)
    assert ran == []


def test_the_pack_nodes_inputs_are_checked_before_any_model(tmp_path):
    # No models: the refusals are about the values, found before anything loads.
    saved = host.settings()
    host.configure(models_dir=tmp_path / "none", output_dir=tmp_path)
    try:
        prompt = json.loads(TEXT_TO_IMAGE.read_text())
        prompt["3"]["inputs"].update(image_size="huge", acceleration="turbo", seed=-1)
        prompt["5"]["inputs"]["enable_safety_checker"] = "yes"
        prompt["6"]["inputs"]["quality"] = 0
        problems = validate(prompt, PACK_CLASSES)
    finally:
        host.restore(saved)
    assert "node 3 (KreaSampler): image_size: 'huge' is not one of" in "\n".join(problems)
    assert "node 3 (KreaSampler): acceleration: 'turbo' is not one of ['none', 'regular', 'high']" in problems
    assert "node 3 (KreaSampler): seed: -1 is smaller than the minimum 0" in problems
    assert "node 5 (KreaSafetyCheck): enable_safety_checker: 'yes' is not a boolean" in problems
    assert "node 6 (KreaSaveImage): quality: 0 is smaller than the minimum 1" in problems
    assert any(p.startswith("node 1 (KreaModelLoader): model_name: Model file 'flux1-krea-dev.safetensors' not found")
               for p in problems)


def test_validate_inputs_gets_none_for_a_linked_input():
    # ComfyUI passes None for inputs of VALIDATE_INPUTS that are linked; the runner crashed with a TypeError.
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["20"] = {"class_type": "PrimitiveWidth", "inputs": {}}
    prompt["3"]["inputs"]["width"] = ["20", 0]
    classes = {**PACK_CLASSES, "PrimitiveWidth": type("PrimitiveWidth", (), {
        "RETURN_TYPES": ("INT",), "FUNCTION": "f", "INPUT_TYPES": classmethod(lambda cls: {"required": {}})})}
    problems = validate(prompt, classes)
    assert not any("KreaSampler" in p for p in problems), problems


# ------------------------------------------------- a node read by two others, nodes without inputs, LoadImage

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

    definitions = local_definitions(PACK_CLASSES, NODE_DISPLAY_NAME_MAPPINGS)
    ui = json.loads((ROOT / "workflows" / "krea_image_to_image.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / "krea_image_to_image.json").read_text())
    assert to_api(ui, definitions)["7"]["inputs"] == api["7"]["inputs"] == {"image": "example.png"}
