"""The pack's readers of ComfyUI's node_errors (the fal routes inside ComfyUI, `run --server`): each problem once,
under the input it is about, although ComfyUI attaches a node's check text to every input that check takes.

The node_errors here have the shape ComfyUI 0.3.64's validate_prompt gives (tests/test_comfyui_host.py gets them
from the real one)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from comfyui_krea.nodes.host.comfyui_errors import node_problems, refusal_text
from comfyui_krea.standalone.remote import node_error_lines


def custom(inputs: list[str], text: str) -> list[dict]:
    """What ComfyUI makes of one VALIDATE_INPUTS text: one error per input the function takes."""
    return [{"type": "custom_validation_failed", "message": "Custom validation failed for node",
             "details": f"{name} - {text}", "extra_info": {"input_name": name}} for name in inputs]


ROOT = Path(__file__).resolve().parent.parent
LOADER = ["model_name", "clip_name", "t5_name", "vae_name"]
SAMPLER = ["width", "height", "guidance_scale", "strength"]
NODE_ERRORS = {
    "1": {"class_type": "KreaModelLoader", "dependent_outputs": ["6"], "errors": custom(
        LOADER, "model_name: Model file 'm' not found.\nt5_name: Model file 't' not found.")},
    "3": {"class_type": "KreaSampler", "dependent_outputs": ["6"], "errors": [
        *custom(SAMPLER, "width must be a multiple of 16 between 16 and 14142, got 1000."),
        {"type": "value_bigger_than_max", "message": "Value 99 bigger than max of 50",
         "details": "num_inference_steps", "extra_info": {"input_name": "num_inference_steps"}}]},
    "7": {"class_type": "SomeOtherPack", "dependent_outputs": ["6"], "errors": custom(["a", "b"], "bad setup")},
}


def test_each_problem_once_under_the_input_it_names():
    got = [(p.node_id, p.input, p.text) for p in node_problems(NODE_ERRORS)]
    assert got == [
        ("1", "model_name", "model_name: Model file 'm' not found."),
        ("1", "t5_name", "t5_name: Model file 't' not found."),
        ("3", "num_inference_steps", "num_inference_steps: Value 99 bigger than max of 50"),
        ("3", "width", "width must be a multiple of 16 between 16 and 14142, got 1000."),
        ("7", None, "bad setup"),  # a text that names none of the inputs is about the node, said once
    ]


def test_a_check_that_returned_false_is_said_once():
    errors = [{"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": name,
               "extra_info": {"input_name": name}} for name in ("a", "b")]
    problems = node_problems({"2": {"class_type": "X", "errors": errors}})
    assert [(p.input, p.text) for p in problems] == [(None, "a, b: the node's own check failed")]


def test_the_fal_routes_and_run_server_word_each_problem_once():
    text = refusal_text({"message": "Prompt outputs failed validation", "details": ""}, NODE_ERRORS)
    assert text.split("; ") == [
        "Prompt outputs failed validation",
        "node 1 (KreaModelLoader): model_name: Model file 'm' not found.",
        "node 1 (KreaModelLoader): t5_name: Model file 't' not found.",
        "node 3 (KreaSampler): num_inference_steps: Value 99 bigger than max of 50",
        "node 3 (KreaSampler): width must be a multiple of 16 between 16 and 14142, got 1000.",
        "node 7 (SomeOtherPack): bad setup"]
    prompt = {"3": {"_meta": {"title": "Krea Sampler"}}}
    lines = node_error_lines({"error": {"message": "Prompt outputs failed validation"}, "node_errors": NODE_ERRORS},
                             prompt)
    assert lines[2:4] == ["node 3 (Krea Sampler): num_inference_steps: Value 99 bigger than max of 50",
                          "node 3 (Krea Sampler): width must be a multiple of 16 between 16 and 14142, got 1000."]
    assert len(lines) == 5 and refusal_text(None, {}) == "ComfyUI refused the workflow"


@pytest.mark.parametrize("error, line", [
    ({"message": "Invalid prompt", "details": "Node 4 has no class_type"}, "Invalid prompt: Node 4 has no class_type"),
    ({"message": "Prompt has no outputs"}, "Prompt has no outputs"),  # no details: no dangling ": "
    ({"details": "XlabsSampler: node class not found"}, "XlabsSampler: node class not found"),  # nor a leading one
], ids=["both", "message", "details"])
def test_the_fal_routes_word_comfyuis_own_error_by_what_it_holds(error, line):
    assert refusal_text(error, {}) == line


@pytest.mark.parametrize("answer, line", [
    ({"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}},
      "node_errors": {}}, "Prompt has no outputs"),  # ComfyUI's own: empty details leave no dangling ": "
    ({"error": {"message": "Prompt has no outputs"}}, "Prompt has no outputs"),
    ({"error": {"message": "The queue is full", "details": "12 waiting on GPU-BOX"}},
     "The queue is full: 12 waiting on GPU-BOX"),  # a proxy's: said as it is
    ({"error": {"type": "queue_full", "details": "12 waiting"}}, "the server refused the workflow: 12 waiting"),
    ({}, "the server refused the workflow"),
], ids=["comfyui", "no details", "details", "no message", "nothing"])
def test_run_server_words_a_refusal_without_node_errors_by_its_error(answer, line):
    assert node_error_lines(answer, {}) == [line]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the frontend module")
def test_the_frontend_rewrites_the_krea_nodes_errors_by_the_same_rule(tmp_path):
    """web/krea_errors.js, which the editor applies to a refused prompt before showing it: the Krea nodes' errors
    become one per problem under its input, the same problems the Python readers give; other nodes' stay as sent."""
    script = (f"const m = await import({json.dumps((ROOT / 'web' / 'krea_errors.js').as_uri())});"
              "const errors = JSON.parse(process.argv[1]);"
              "const dropped = m.distinctNodeErrors(errors, (t) => t.startsWith('Krea'));"
              "console.log(JSON.stringify({dropped, errors}));")
    done = subprocess.run(["node", "--input-type=module", "-e", script, json.dumps(NODE_ERRORS)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    rewritten = [(node_id, e["extra_info"]["input_name"], e["details"].split(" - ", 1)[1] if " - " in e["details"]
                  else e["details"]) for node_id, entry in got["errors"].items() if node_id != "7"
                 for e in entry["errors"] if e["type"] == "custom_validation_failed"]
    python = [(p.node_id, p.input, p.text) for p in node_problems(NODE_ERRORS) if p.node_id != "7"
              and p.input != "num_inference_steps"]
    assert rewritten == python
    assert got["errors"]["7"] == NODE_ERRORS["7"] and got["errors"]["3"]["errors"][0] == NODE_ERRORS["3"]["errors"][4]
    assert got["dropped"] == (4 - 2) + (4 - 1)
