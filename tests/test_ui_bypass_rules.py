"""The two rules behind a bypassed node's conversion, input by input: which types fit (LiteGraph's
isValidConnection) and which input a bypassed node passes on (ExecutableNodeDTO's getBypassSlotIndex in frontend
1.27), as tables, and the same tables answered by the frontend's own code from the package ComfyUI installs. Custom
nodes bring inputs of any type ("*") and of type lists ("IMAGE,MASK"), which the core nodes of
tests/ui_conversion_cases.py do not have."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from comfyui_krea.standalone.ui_workflow import bypass_input, fits

FIT_CASES = [
    ("", "IMAGE", True), ("*", "IMAGE", True), ("IMAGE", "", True), ("IMAGE", "*", True), (None, "IMAGE", True),
    ("IMAGE", None, True), ("IMAGE", "IMAGE", True), ("image", "IMAGE", True), ("IMAGE", "LATENT", False),
    ("IMAGE,MASK", "MASK", True), ("MASK", "IMAGE,MASK", True), ("IMAGE,MASK", "LATENT", False),
    ("LATENT", "IMAGE,MASK", False), ("IMAGE,MASK", "LATENT,mask", True), ("IMAGE,*", "LATENT", True),
]


@pytest.mark.parametrize("a, b, expected", FIT_CASES)
def test_types_fit_as_litegraph_connects_them(a, b, expected):
    assert fits(a, b) is expected


def typed_node(inputs, outputs):
    return {"inputs": [{"type": t} if t is not None else {} for t in inputs],
            "outputs": [{"type": t} if t is not None else {} for t in outputs]}


BYPASS_CASES = [
    # any type wanted: the input at the output's index, else the first
    (["LATENT", "LATENT"], ["LATENT"], 0, "*", 0),
    (["IMAGE"], ["IMAGE", "MASK"], 1, "*", 0),
    (["IMAGE"], ["IMAGE", "MASK"], 1, "", 0),
    (["IMAGE", "MASK"], ["IMAGE", "MASK"], 1, "*", 1),
    # the input at the output's index when it fits both the output and the wanted type
    (["LATENT", "LATENT"], ["LATENT"], 0, "LATENT", 0),
    (["LATENT", "IMAGE"], ["LATENT"], 0, "IMAGE", 1),  # fits the output, not the wanted type
    (["MASK", "IMAGE"], ["IMAGE"], 0, "IMAGE,MASK", 1),  # fits the wanted type, not the output
    (["IMAGE"], ["IMAGE", "IMAGE"], 1, "IMAGE", 0),  # no input at that index
    # else the first input of exactly the wanted type, before any that only fits
    (["IMAGE,MASK", "MASK"], ["LATENT", "LATENT", "*"], 2, "MASK", 1),
    # else the first that fits both, else none
    (["IMAGE", "MASK"], ["MASK"], 0, "IMAGE,MASK", 1),
    (["IMAGE"], ["IMAGE"], 0, "MASK", -1),
    (["MASK"], ["IMAGE"], 0, "IMAGE,MASK", -1),
    # an output without a type, or no outputs listed, fits anything
    (["IMAGE"], [None], 0, "IMAGE,MASK", 0),
    (["IMAGE"], [], 0, "IMAGE,MASK", 0),  # (the frontend fails on an output that is not there)
]


@pytest.mark.parametrize("inputs, outputs, slot, kind, expected", BYPASS_CASES)
def test_a_bypassed_node_passes_the_input_the_frontend_picks(inputs, outputs, slot, kind, expected):
    assert bypass_input(typed_node(inputs, outputs), slot, kind) == expected


def _method_source(bundle: str, signature: str) -> str:
    """The text of one method in the frontend's bundle, from its signature to its matching brace."""
    start = bundle.index(signature)
    depth = 0
    for index in range(bundle.index("{", start), len(bundle)):
        depth += {"{": 1, "}": -1}.get(bundle[index], 0)
        if depth == 0:
            return bundle[start:index + 1]
    raise AssertionError(f"{signature} has no end")


def test_both_tables_are_what_the_frontends_own_code_answers(tmp_path):
    """The frontend package ComfyUI installs holds the two functions: run them in node on the same cases."""
    frontend = pytest.importorskip("comfyui_frontend_package")
    if shutil.which("node") is None:
        pytest.skip("needs node")
    bundles = list((Path(frontend.__file__).parent / "static" / "assets").glob("index-*.js"))
    bundle = next((b.read_text(encoding="utf-8") for b in bundles if "getBypassSlotIndex(slot, type) {" in
                   b.read_text(encoding="utf-8")), None)
    assert bundle is not None, "the frontend's bundle no longer has getBypassSlotIndex: read its new rule"
    valid = _method_source(bundle, "isValidConnection(type_a, type_b) {")
    bypass = _method_source(bundle, "#getBypassSlotIndex(slot, type) {").removeprefix("#")
    cases = {"fit": [[a, b] for a, b, _ in FIT_CASES],
             "bypass": [[typed_node(i, o), slot, kind] for i, o, slot, kind, _ in BYPASS_CASES if slot < len(o)]}
    script = tmp_path / "rules.mjs"
    script.write_text(f"""
const LiteGraph = {{ EVENT: -1, ACTION: -1, {valid} }};
const cases = {json.dumps(cases)};
const fit = cases.fit.map(([a, b]) => LiteGraph.isValidConnection(a, b));
const bypass = cases.bypass.map(([node, slot, kind]) =>
    ({{ inputs: node.inputs, node, {bypass} }}).getBypassSlotIndex(slot, kind));
console.log(JSON.stringify({{ fit, bypass }}));
""")
    answer = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True,
                                       timeout=60).stdout)
    assert answer["fit"] == [expected for *_, expected in FIT_CASES]
    assert answer["bypass"] == [expected for i, o, slot, kind, expected in BYPASS_CASES if slot < len(o)]
