"""What `run` tells the user when a run is done (the nodes' reports, one `saved PATH` line per image, the time on
stderr) and what the saved images embed beside the prompt (the UI-format workflow with the run's values)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from comfyui_krea import NODE_DISPLAY_NAME_MAPPINGS
from comfyui_krea.standalone import cli
from comfyui_krea.standalone.cli import embedded_workflow, report
from comfyui_krea.standalone.node_classes import PACK_CLASSES
from comfyui_krea.standalone.overrides import api_prompt
from comfyui_krea.standalone.ui_workflow import local_definitions

ROOT = Path(__file__).resolve().parent.parent
API_TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
UI_TEXT_TO_IMAGE = ROOT / "workflows" / "krea_text_to_image.json"


def test_report_labels_each_nodes_text_lists_the_images_and_times_the_run(monkeypatch, capsys):
    prompt = json.loads(API_TEXT_TO_IMAGE.read_text())  # node 3: KreaSampler, node 5: KreaSafetyCheck
    monkeypatch.setattr(cli.time, "perf_counter", lambda: 100.5)  # the run started at 98.0
    report(prompt, [("3", "acceleration none: 2 of 2 steps computed fully"), ("5", "[false, true]"),
                    ("9", "a node the prompt does not have")],
           [Path("output/krea/krea_00001_.png"), Path("output/krea/krea_00002_.png")], 98.0)
    out, err = capsys.readouterr()
    # The safety check's flags under fal's name for them; any other node's text is the sampler's report.
    assert out == ("sampler: acceleration none: 2 of 2 steps computed fully\n"
                   "has_nsfw_concepts: [false, true]\n"
                   "sampler: a node the prompt does not have\n"
                   "saved output/krea/krea_00001_.png\n"
                   "saved output/krea/krea_00002_.png\n")
    assert err == "done in 2.5 s\n"


def test_report_of_a_run_with_nothing_to_tell_prints_only_the_time(monkeypatch, capsys):
    monkeypatch.setattr(cli.time, "perf_counter", lambda: 7.0)
    report({}, [], [], 7.0)
    assert capsys.readouterr() == ("", "done in 0.0 s\n")


def definitions() -> dict[str, dict]:
    return local_definitions(PACK_CLASSES, NODE_DISPLAY_NAME_MAPPINGS)


def test_a_ui_workflow_is_embedded_with_the_values_the_run_used():
    workflow = json.loads(UI_TEXT_TO_IMAGE.read_text())
    prompt = api_prompt(workflow, definitions())
    prompt["2"]["inputs"]["prompt"] = "a fox"  # as --prompt and --seed write them
    prompt["3"]["inputs"]["seed"] = 77
    embedded = embedded_workflow(workflow, prompt, definitions())
    # The file's workflow with the two widgets changed, and nothing else (the seed control stays as saved).
    expected = copy.deepcopy(workflow)
    nodes = {node["id"]: node for node in expected["nodes"]}
    nodes[2]["widgets_values"] = ["a fox"]
    nodes[3]["widgets_values"] = ["landscape_4_3", 1024, 768, 28, 4.5, 77, "randomize", 1, "none", 0.95]
    assert embedded == {"workflow": expected}
    assert workflow == json.loads(UI_TEXT_TO_IMAGE.read_text())  # the file as read is left as it was


def test_an_api_workflow_embeds_nothing_beside_the_prompt():
    # An API-format file has no UI form; ComfyUI loads a dropped image's prompt alone.
    workflow = json.loads(API_TEXT_TO_IMAGE.read_text())
    assert embedded_workflow(workflow, copy.deepcopy(workflow), definitions()) is None
