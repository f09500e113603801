"""web/krea_fal.js, run by Node.js: the Krea sampler's widgets <-> a fal request, the size the sampler makes and
the report badges, on the shipped workflows.

The graph is the shipped UI workflow behind the LiteGraph node interface the module uses (widgets by name, inputs,
outputs, getInputNode, getOutputNodes), the widget names and node definitions come from the nodes' INPUT_TYPES (what
GET /object_info serves), and the oracle for a copied request is the pack's own fal server side: the endpoint's
schema accepts it and fal_api.workflow turns it back into the same widget values; the field table is
fal_api/fields.py's. The browser test (tests/test_browser.py) runs the same module inside ComfyUI's frontend.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from comfyui_krea import NODE_CLASS_MAPPINGS
from comfyui_krea.fal_api import endpoints, fields
from comfyui_krea.fal_api.endpoints import ENDPOINTS
from comfyui_krea.fal_api.workflow import workflow_for
from comfyui_krea.sampling import parameters

ROOT = Path(__file__).resolve().parent.parent
MODULE = (ROOT / "web" / "krea_fal.js").as_uri()
NODE = shutil.which("node")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
KREA_TYPES = ("KreaSampler", "KreaTextEncode", "KreaSafetyCheck", "KreaSaveImage")

pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the frontend module")

# A LiteGraph-shaped graph over a UI workflow: what the browser's nodes offer to krea_fal.js, nothing more.
HARNESS = """
import * as fal from MODULE;
import { readFileSync } from 'node:fs';
const data = JSON.parse(readFileSync(process.argv[1], 'utf8'));
function graphOf(workflow, widgetNames) {
  const links = new Map(workflow.links.map((l) => [l[0], l]));
  const nodes = new Map();
  for (const n of workflow.nodes) {
    const names = widgetNames[n.type] ?? [];
    nodes.set(n.id, {
      id: n.id, type: n.type,
      widgets: names.map((name, i) => ({ name, value: n.widgets_values[i] })),
      inputs: (n.inputs ?? []).map((i) => ({ name: i.name, link: i.link ?? null })),
      outputs: (n.outputs ?? []).map((o) => ({ name: o.name, links: o.links ?? [] })),
    });
  }
  for (const node of nodes.values()) {
    node.getInputNode = (slot) => {
      const link = links.get(node.inputs[slot]?.link);
      return link ? nodes.get(link[1]) ?? null : null;
    };
    node.getOutputNodes = (slot) => {
      const ids = node.outputs[slot]?.links ?? [];
      return ids.length ? ids.map((id) => nodes.get(links.get(id)[3])) : null;
    };
  }
  return nodes;
}
const specs = Object.fromEntries(Object.entries(data.definitions).map(([k, d]) => [k, fal.inputSpecs(d)]));
const graph = data.workflow ? graphOf(data.workflow, data.widgetNames) : null;
const sampler = graph ? [...graph.values()].find((n) => n.type === 'KreaSampler') : null;
const values = (node) => Object.fromEntries(node.widgets.map((w) => [w.name, w.value]));
function apply(changes, nodes) {
  for (const { role, widget, value } of changes) nodes[role].widgets.find((w) => w.name === widget).value = value;
}
const out = await (async () => { CODE })();
console.log(JSON.stringify(out));
"""


def definition(class_type: str) -> dict:
    """The node's GET /object_info entry, as far as the frontend module reads it."""
    return {"name": class_type, "input": NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()}


def widget_names(class_type: str) -> list[str]:
    """The node's widgets in widgets_values order: widget inputs, control_after_generate after a seed."""
    if class_type == "LoadImage":
        return ["image", "upload"]
    if class_type not in NODE_CLASS_MAPPINGS:
        return []
    names = []
    spec = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    for name, input_spec in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        kind, options = input_spec[0], (input_spec[1] if len(input_spec) > 1 else {})
        if isinstance(kind, list) or kind in WIDGET_TYPES:
            names.append(name)
            if options.get("control_after_generate"):
                names.append("control_after_generate")
    return names


def shipped(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def run(code: str, tmp_path: Path, workflow: dict | None = None, **extra) -> object:
    """What `code` (the body of an async function over the harness's names) returns, as JSON."""
    names = {node["type"]: widget_names(node["type"]) for node in (workflow or {}).get("nodes", [])}
    for node in (workflow or {}).get("nodes", []):
        assert len(names[node["type"]]) == len(node["widgets_values"]), node["type"]
    data = {"workflow": workflow, "widgetNames": names, "definitions": {t: definition(t) for t in KREA_TYPES},
            **extra}
    (tmp_path / "data.json").write_text(json.dumps(data))
    script = HARNESS.replace("MODULE", json.dumps(MODULE)).replace("CODE", code)
    done = subprocess.run([NODE, "--input-type=module", "-e", script, str(tmp_path / "data.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def widgets_of(workflow: dict, class_type: str) -> dict:
    node = next(n for n in workflow["nodes"] if n["type"] == class_type)
    return dict(zip(widget_names(class_type), node["widgets_values"]))


def test_the_tables_are_the_packs(tmp_path):
    got = run("return {sizes: fal.IMAGE_SIZES, custom: fal.CUSTOM_SIZE, multiple: fal.SIZE_MULTIPLE, "
              "maxSide: fal.MAX_SIDE, prompt: fal.MAX_PROMPT_CHARS, t2i: fal.TEXT_TO_IMAGE, i2i: fal.IMAGE_TO_IMAGE, "
              "fields: Object.fromEntries(Object.entries(fal.FIELDS).map(([k, f]) => "
              "[k, [fal.ROLE_NODES[f.role], f.widget]])), unmapped: Object.keys(fal.UNMAPPED).sort()}", tmp_path)
    loaded = (fields.LOAD_IMAGE, fields.LOAD_IMAGE_MASK)
    in_graph = {k: [p.node, p.input] for k, p in fields.FIELD_INPUTS.items() if p.node not in loaded}
    assert got == {"sizes": {k: list(v) for k, v in parameters.IMAGE_SIZES.items()},
                   "custom": parameters.CUSTOM_SIZE, "multiple": parameters.SIZE_MULTIPLE,
                   "maxSide": parameters.MAX_SIDE, "prompt": parameters.MAX_PROMPT_CHARS,
                   "t2i": endpoints.TEXT_TO_IMAGE, "i2i": endpoints.IMAGE_TO_IMAGE, "fields": in_graph,
                   # the image and the mask come from the load nodes' files, which a paste cannot set
                   "unmapped": sorted({*fields.UNMAPPED, "image_url", "mask_url"})}


def test_input_specs_read_both_combo_spellings(tmp_path):
    got = run("return [fal.inputSpecs(data.old), fal.inputSpecs(data.new)]", tmp_path,
              old={"input": {"required": {"a": [["x", "y"], {}], "n": ["INT", {"min": 1, "max": 5}],
                                          "m": ["MODEL"]}, "optional": {"b": ["BOOLEAN", {}]}}},
              new={"input": {"required": {"a": ["COMBO", {"options": ["x", "y"]}], "f": ["FLOAT", {"step": 0.1}]}}})
    assert got[0] == {"a": {"kind": "combo", "values": ["x", "y"]}, "n": {"kind": "int", "min": 1, "max": 5},
                      "b": {"kind": "boolean"}}
    assert got[1] == {"a": {"kind": "combo", "values": ["x", "y"]}, "f": {"kind": "float", "step": 0.1}}


@pytest.mark.parametrize("name", ["krea_text_to_image", "krea_image_to_image"])
def test_copy_is_a_request_the_fal_server_turns_back_into_the_same_widgets(name, tmp_path):
    workflow = shipped(name)
    got = run("return fal.toFalRequest(fal.falNodes(sampler))", tmp_path, workflow)
    image_to_image = name == "krea_image_to_image"
    sampler = widgets_of(workflow, "KreaSampler")
    expected = {"prompt": widgets_of(workflow, "KreaTextEncode")["prompt"]}
    if not image_to_image:
        expected["image_size"] = sampler["image_size"]
    expected |= {k: sampler[k] for k in ("num_inference_steps", "guidance_scale", "seed", "num_images",
                                         "acceleration")}
    if image_to_image:
        expected["strength"] = sampler["strength"]
    expected |= {"enable_safety_checker": widgets_of(workflow, "KreaSafetyCheck")["enable_safety_checker"],
                 "output_format": widgets_of(workflow, "KreaSaveImage")["output_format"]}
    assert got["body"] == expected
    assert list(got["body"]) == list(expected)  # fal's field order, as its docs list them
    assert got["endpoint"] == (endpoints.IMAGE_TO_IMAGE if image_to_image else endpoints.TEXT_TO_IMAGE)
    assert any("image_url" in note for note in got["notes"]) == image_to_image

    body = dict(got["body"], **({"image_url": "https://example.invalid/a.png"} if image_to_image else {}))
    endpoint = ENDPOINTS[got["endpoint"]]
    arguments = endpoint.parse(body)  # the pack's fal server accepts it as it is
    api = workflow_for(endpoint, arguments, body["seed"], "request",
                       {"image_url": "input.png"} if image_to_image else None)
    by_type = {node["class_type"]: node["inputs"] for node in api.values()}
    for key, value in sampler.items():
        if key in by_type["KreaSampler"] and key not in ("width", "height"):  # unused by a preset or an image
            assert by_type["KreaSampler"][key] == value, key
    assert by_type["KreaTextEncode"]["prompt"] == expected["prompt"]
    assert by_type["KreaSafetyCheck"]["enable_safety_checker"] == expected["enable_safety_checker"]
    assert by_type["KreaSaveImage"]["output_format"] == expected["output_format"]


def test_custom_size_and_a_graph_without_safety_check_or_save(tmp_path):
    workflow = shipped("krea_text_to_image")
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KreaSampler")
    sampler["widgets_values"][:3] = ["custom", 64, 48]
    for node in workflow["nodes"]:
        if node["type"] in ("KreaSafetyCheck", "KreaSaveImage"):
            node["type"], node["widgets_values"] = "PreviewImage", []  # something else downstream
    got = run("return fal.toFalRequest(fal.falNodes(sampler))", tmp_path, workflow)
    assert got["body"]["image_size"] == {"width": 64, "height": 48}
    assert got["body"]["enable_safety_checker"] is False  # fal would check; this graph does not
    assert "output_format" not in got["body"]
    assert any("Safety Check" in note for note in got["notes"]) and any("Save Image" in note for note in got["notes"])
    endpoint = ENDPOINTS[endpoints.TEXT_TO_IMAGE]
    api = workflow_for(endpoint, endpoint.parse(got["body"]), 1, "request")
    inputs = next(n["inputs"] for n in api.values() if n["class_type"] == "KreaSampler")
    assert (inputs["image_size"], inputs["width"], inputs["height"]) == ("custom", 64, 48)


def test_no_prompt_without_a_text_encode_node(tmp_path):
    workflow = shipped("krea_text_to_image")
    for node in workflow["nodes"]:
        if node["type"] == "KreaTextEncode":
            node["type"], node["widgets_values"] = "CLIPTextEncode", []
    got = run("return fal.toFalRequest(fal.falNodes(sampler))", tmp_path, workflow)
    assert "prompt" not in got["body"]
    assert any("Krea Text Encode" in note for note in got["notes"])


@pytest.mark.parametrize("name", ["krea_text_to_image", "krea_image_to_image"])
def test_paste_round_trip_restores_the_widgets(name, tmp_path):
    got = run("""
      const nodes = fal.falNodes(sampler);
      const before = fal.toFalRequest(nodes).body;
      const original = {sampler: values(nodes.sampler), encoder: values(nodes.encoder), safety: values(nodes.safety),
                        save: values(nodes.save)};
      const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
      set(nodes.sampler, 'image_size', 'custom'); set(nodes.sampler, 'width', 96); set(nodes.sampler, 'seed', 7);
      set(nodes.sampler, 'num_inference_steps', 3); set(nodes.sampler, 'guidance_scale', 9.5);
      set(nodes.sampler, 'num_images', 2); set(nodes.sampler, 'acceleration', 'high');
      set(nodes.sampler, 'strength', 0.5); set(nodes.encoder, 'prompt', 'something else');
      set(nodes.safety, 'enable_safety_checker', false); set(nodes.save, 'output_format', 'png');
      const pasted = fal.fromFalRequest(JSON.stringify(before), nodes, specs);
      apply(pasted.changes, nodes);
      return {before, after: fal.toFalRequest(nodes).body, pasted, original,
              restored: {sampler: values(nodes.sampler), encoder: values(nodes.encoder), safety: values(nodes.safety),
                         save: values(nodes.save)}};
    """, tmp_path, shipped(name))
    assert got["pasted"]["applied"] and not got["pasted"]["invalid"] and not got["pasted"]["skipped"]
    assert got["after"] == got["before"]
    restored, original = got["restored"], got["original"]
    assert restored["encoder"] == original["encoder"] and restored["safety"] == original["safety"]
    assert restored["save"] == original["save"]
    # What the request does not carry stays as typed meanwhile: width and height under a preset (or for
    # image-to-image, with image_size), strength for text-to-image.
    not_carried = {"width", "image_size"} if name == "krea_image_to_image" else {"width", "strength"}
    assert {k: v for k, v in restored["sampler"].items() if k not in not_carried} == \
        {k: v for k, v in original["sampler"].items() if k not in not_carried}
    assert "Set from the fal request" in got["pasted"]["message"]


def test_paste_lists_the_fields_it_cannot_map_and_sets_the_others(tmp_path):
    request = {"prompt": "a red fox", "image_url": "https://example.invalid/fox.png", "sync_mode": True,
               "num_inference_steps": 12, "loras": [], "strength": 0.5}
    got = run("""
      const nodes = fal.falNodes(sampler);
      const pasted = fal.fromFalRequest(data.request, nodes, specs);
      apply(pasted.changes, nodes);
      return {pasted, prompt: fal.widgetValue(nodes.encoder, 'prompt'),
              steps: fal.widgetValue(nodes.sampler, 'num_inference_steps')};
    """, tmp_path, shipped("krea_text_to_image"), request=request)
    pasted = got["pasted"]
    assert pasted["applied"] and pasted["set"] == ["prompt", "num_inference_steps"]
    assert (got["prompt"], got["steps"]) == ("a red fox", 12)
    message = pasted["message"]
    for field in ("image_url", "sync_mode", "loras", "strength"):
        assert field in message and any(s.startswith(field) for s in pasted["skipped"]), field
    assert "Load Image" in message and "image-to-image only" in message


def test_a_wrong_value_changes_nothing_and_every_problem_is_listed(tmp_path):
    request = {"prompt": "a red fox", "num_inference_steps": 80, "acceleration": "turbo", "image_size": "huge",
               "guidance_scale": "high", "num_images": 2.5, "enable_safety_checker": "yes", "seed": 2**60,
               "output_format": "gif", "sync_mode": False}
    got = run("""
      const nodes = fal.falNodes(sampler);
      const before = JSON.stringify(fal.toFalRequest(nodes));
      const pasted = fal.fromFalRequest(JSON.stringify(data.request), nodes, specs);
      apply(pasted.changes, nodes);
      return {pasted, unchanged: JSON.stringify(fal.toFalRequest(nodes)) === before};
    """, tmp_path, shipped("krea_text_to_image"), request=request)
    pasted = got["pasted"]
    assert not pasted["applied"] and pasted["changes"] == [] and got["unchanged"]
    assert len(pasted["invalid"]) == 8
    message = pasted["message"]
    assert message.startswith("Nothing was changed")
    for text in ("num_inference_steps 80 is outside 1 to 50", '"turbo" is not one of none, regular, high',
                 '"huge"', "guidance_scale must be a number", "num_images must be a whole number",
                 "enable_safety_checker must be true or false", "seed is larger than 9007199254740991",
                 '"gif" is not one of jpeg, png, webp', "sync_mode"):
        assert text in message, text


@pytest.mark.parametrize("text", ["not json", "[1, 2]", "42", "null"])
def test_paste_of_something_else_changes_nothing(text, tmp_path):
    got = run("return fal.fromFalRequest(data.text, fal.falNodes(sampler), specs)", tmp_path,
              shipped("krea_text_to_image"), text=text)
    assert not got["applied"] and got["changes"] == [] and got["message"].startswith("Nothing was changed")


def test_paste_of_a_custom_size_rounds_as_fal_does_and_image_to_image_keeps_the_input_size(tmp_path):
    got = run("""
      const t2i = fal.fromFalRequest({image_size: {width: 1000, height: 700}, seed: null}, fal.falNodes(sampler),
                                     specs);
      return t2i;
    """, tmp_path, shipped("krea_text_to_image"))
    assert got["changes"] == [{"role": "sampler", "widget": "image_size", "value": "custom"},
                              {"role": "sampler", "widget": "width", "value": 992},
                              {"role": "sampler", "widget": "height", "value": 688}]
    assert "rounded down to 992×688" in got["message"] and "seed is null" in got["message"]
    got = run("return fal.fromFalRequest({image_size: 'square', strength: 0.4}, fal.falNodes(sampler), specs)",
              tmp_path, shipped("krea_image_to_image"))
    assert got["changes"] == [{"role": "sampler", "widget": "strength", "value": 0.4}]
    assert any(s.startswith("image_size (image-to-image") for s in got["skipped"])


def test_resolved_size(tmp_path):
    got = run("""
      return {presets: Object.fromEntries(Object.keys(fal.IMAGE_SIZES).map((p) =>
                [p, fal.resolvedSize({image_size: p, width: 16, height: 16})])),
              custom: fal.resolvedSize({image_size: 'custom', width: 64, height: 48}),
              odd: fal.resolvedSize({image_size: 'custom', width: 100, height: 48}),
              i2i: fal.resolvedSize({image_size: 'square', width: 64, height: 48}, true)};
    """, tmp_path)
    for preset, (width, height) in parameters.IMAGE_SIZES.items():
        assert got["presets"][preset] == {"width": width, "height": height, "text": f"{width}×{height}"}
    assert got["custom"] == {"width": 64, "height": 48, "text": "64×48"}
    assert got["odd"]["width"] is None and "multiples of 16" in got["odd"]["text"]
    assert got["i2i"] == {"width": None, "height": None, "text": "size of the input image"}


def test_report_badges(tmp_path):
    sampler = {"acceleration": "regular", "steps": 28, "computed": 20, "reused": 8, "seconds": 3.2149,
               "width": 1024, "height": 768, "images": 1}
    summary = "acceleration regular: 20 of 28 steps computed fully, 8 reused; fp8 matmuls need a GPU"
    got = run("""
      return {sampler: fal.reportBadges('KreaSampler', data.sampler, data.summary),
              clean: fal.reportBadges('KreaSafetyCheck', {has_nsfw_concepts: [false, false], enabled: true,
                                                          seconds: 0.1}),
              flagged: fal.reportBadges('KreaSafetyCheck', {has_nsfw_concepts: [true, false], enabled: true}),
              off: fal.reportBadges('KreaSafetyCheck', {has_nsfw_concepts: [false], enabled: false, seconds: 0}),
              none: fal.reportBadges('KreaSampler', undefined)};
    """, tmp_path, sampler=sampler, summary=summary)
    texts = [b["text"] for b in got["sampler"]]
    assert texts == ["28 steps", "20 computed", "8 reused", "acceleration regular", "made 1024×768",
                     "⚠ fp8 matmuls need a GPU", "3.21 s"]
    assert got["sampler"][2]["tone"] == "good"
    assert [b["text"] for b in got["clean"]] == ["has_nsfw_concepts: none of 2", "0.10 s"]
    assert got["flagged"] == [{"text": "has_nsfw_concepts: 1 of 2", "tone": "bad"}]
    assert [b["text"] for b in got["off"]] == ["safety check off", "0.00 s"]
    assert got["none"] == []
