"""A UI-format workflow (what ComfyUI saves, the files in workflows/) -> the API prompt its frontend would queue.

The node definitions say which inputs are widgets, in which order, so that the positional `widgets_values` can be
named: they come from a server's GET /object_info, or from the pack's own node classes (`local_definitions`).
As the frontend's graphToPrompt: every node but muted (mode 2) and bypassed (mode 4) ones becomes a prompt node;
a link through a bypassed node goes to that node's input of the same type, a link from a muted node is dropped;
Reroute nodes pass their input through; a PrimitiveNode's value is written into the inputs it feeds; the extra
widget values of `control_after_generate` (after seeds) and of image-upload buttons are skipped; groups, notes and
other frontend-only nodes are left out. Subgraphs (frontend 1.24+) are not expanded: such a file is refused.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

MUTED, BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


class ConversionError(ValueError):
    """The UI workflow cannot be turned into an API prompt; the message says which node and why."""


def local_definitions(classes: Mapping[str, type], display_names: Mapping[str, str] | None = None) -> dict[str, dict]:
    """/object_info-shaped definitions of node classes (the pack's own, run without a server)."""
    display_names = display_names or {}
    out = {}
    for name, cls in classes.items():
        spec = cls.INPUT_TYPES()
        out[name] = {"input": {k: dict(spec.get(k, {})) for k in ("required", "optional", "hidden")},
                     "input_order": {k: list(spec.get(k, {})) for k in ("required", "optional")},
                     "output": list(getattr(cls, "RETURN_TYPES", ())),
                     "display_name": display_names.get(name, name), "name": name}
    return out


def _kind(spec: Any) -> str:
    """An input's type: INT, COMBO (a list of choices or the new COMBO form), MODEL, ..."""
    first = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(first, (list, tuple)) else str(first)


def _options(spec: Any) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def widget_inputs(definition: dict) -> list[tuple[str, dict, str]]:
    """(name, options, kind) of the inputs shown as widgets, in the frontend's order (required, then optional)."""
    inputs, order = definition.get("input", {}), definition.get("input_order", {})
    out = []
    for group in ("required", "optional"):
        specs = inputs.get(group, {}) or {}
        for name in order.get(group, list(specs)):
            spec = specs.get(name)
            kind, options = _kind(spec), _options(spec)
            if kind in WIDGET_TYPES and not options.get("forceInput"):
                out.append((name, options, kind))
    return out


def _has_control(name: str, options: dict, kind: str) -> bool:
    if kind not in ("INT", "FLOAT"):
        return False
    return bool(options.get("control_after_generate", name in ("seed", "noise_seed")))


def _widget_slots(values: list, widgets: list[tuple[str, dict, str]]) -> dict[str, int]:
    """Input name -> its index in a node's positional widgets_values."""
    slots: dict[str, int] = {}
    index = 0
    for name, options, kind in widgets:
        if index >= len(values):
            break
        slots[name] = index
        index += 1
        # The frontend's extra widgets: the "after generate" control of seeds and the upload button of images.
        if _has_control(name, options, kind) and index < len(values) and values[index] in CONTROL_VALUES:
            index += 1
        elif any(options.get(o) for o in UPLOAD_OPTIONS) and len(values) - index > len(widgets) - len(slots):
            index += 1
    return slots


def widget_values(node: dict, definition: dict) -> dict[str, Any]:
    """The node's widget values by input name."""
    values = node.get("widgets_values")
    widgets = widget_inputs(definition)
    if isinstance(values, dict):  # some nodes save their values by name
        return {name: values[name] for name, _, _ in widgets if name in values}
    values = list(values or [])
    return {name: values[index] for name, index in _widget_slots(values, widgets).items()}


def with_values(workflow: dict, prompt: Mapping[str, dict], definitions: Mapping[str, dict]) -> dict:
    """A copy of the UI workflow whose widgets hold the values of `prompt` (its API prompt after the command line's
    options): what a saved image embeds, so that dropped on ComfyUI it restores the values it was made with."""
    out = copy.deepcopy(workflow)
    for node in out.get("nodes", []):
        inputs = prompt.get(str(node.get("id")), {}).get("inputs", {})
        definition = definitions.get(node.get("type"))
        values = node.get("widgets_values")
        if not inputs or definition is None or not isinstance(values, list):
            continue
        for name, index in _widget_slots(values, widget_inputs(definition)).items():
            if name in inputs and not isinstance(inputs[name], list):  # a list is a link, not a widget value
                values[index] = inputs[name]
    return out


def _links(workflow: dict) -> dict[int, tuple[int, int, str]]:
    """link id -> (origin node id, origin slot, type); links are lists or (newer files) objects."""
    out = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type", "*"))
        else:
            out[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else "*")
    return out


def to_api(workflow: dict, definitions: Mapping[str, dict]) -> dict:
    """The API prompt of a UI-format workflow (see the module docstring for what is resolved how)."""
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ConversionError("this workflow holds subgraphs; convert it in ComfyUI (Export (API)) and run that file")
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    links = _links(workflow)

    def source(link_id: int | None, depth: int = 0) -> tuple[int, int] | Any | None:
        """Where a link really comes from: (node id, slot), a primitive's literal value wrapped in a 1-tuple,
        or None when it comes from nothing that runs."""
        if link_id is None or link_id not in links or depth > len(nodes):
            return None
        origin, slot, kind = links[link_id]
        node = nodes.get(origin)
        if node is None:
            return None
        if node.get("type") == "Reroute":
            return source((node.get("inputs") or [{}])[0].get("link"), depth + 1)
        if node.get("type") == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return (values[0],) if values else None
        if node.get("mode") == MUTED:
            return None
        if node.get("mode") == BYPASSED:
            candidates = [i for i in node.get("inputs", []) if i.get("link") is not None]
            same = [i for i in candidates if i.get("type") == kind]
            at_slot = [i for n, i in enumerate(node.get("inputs", [])) if n == slot and i in same]
            chosen = (at_slot or same)[:1]
            return source(chosen[0]["link"], depth + 1) if chosen else None
        return origin, slot

    prompt: dict[str, dict] = {}
    for node_id, node in nodes.items():
        kind = node.get("type")
        if node.get("mode") in (MUTED, BYPASSED) or kind in FRONTEND_ONLY:
            continue
        definition = definitions.get(kind)
        if definition is None:
            raise ConversionError(f"node {node_id} is of type {kind!r}, which this server does not have "
                                  "(a missing custom node pack?)")
        inputs: dict[str, Any] = dict(widget_values(node, definition))
        for slot in node.get("inputs", []) or []:
            found = source(slot.get("link"))
            name = slot.get("name") if not isinstance(slot.get("widget"), dict) else slot["widget"].get("name")
            if found is None:
                if slot.get("link") is not None and not isinstance(slot.get("widget"), dict):
                    inputs.pop(name, None)  # linked to a muted node: the input is left out, as the frontend does
                continue
            inputs[name] = found[0] if len(found) == 1 else [str(found[0]), found[1]]
        title = node.get("title") or definition.get("display_name") or kind
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt


def is_ui_workflow(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)
