"""A UI-format workflow (what ComfyUI saves, the files in workflows/) -> the API prompt its frontend would queue.

The node definitions say which inputs are widgets, in which order, so that the positional `widgets_values` can be
named: they come from a server's GET /object_info, or from the pack's own node classes (`local_definitions`).
As the frontend's graphToPrompt (ExecutableNodeDTO.resolveInput/resolveOutput in frontend 1.27): every node but
muted (mode 2) and bypassed (mode 4) ones becomes a prompt node. A link through a bypassed node continues from one
of that node's inputs, chosen by the type of the input being resolved: the input at the output's own index when its
type fits, else the first input of exactly that type, else the first whose type fits (connected or not: an
unconnected choice resolves to nothing), through chains of bypassed nodes and Reroutes. An input that resolves to
nothing keeps its widget value, if it has one; an input that resolves to a muted node is left out, widget value and
all. Reroute nodes pass their input through; a PrimitiveNode's value is written into the inputs it feeds; the extra
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


def _widget_slots(values: list, definition: dict) -> dict[str, int]:
    """Input name -> its index in a node's positional widgets_values."""
    widgets = widget_inputs(definition)
    upload_after = _upload_button_after(definition)
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
        elif name == upload_after and len(values) - index > len(widgets) - len(slots):
            index += 1
    return slots


def widget_values(node: dict, definition: dict) -> dict[str, Any]:
    """The node's widget values by input name."""
    values = node.get("widgets_values")
    widgets = widget_inputs(definition)
    if isinstance(values, dict):  # some nodes save their values by name
        return {name: values[name] for name, _, _ in widgets if name in values}
    values = list(values or [])
    return {name: values[index] for name, index in _widget_slots(values, definition).items()}


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
        for name, index in _widget_slots(values, definition).items():
            if name in inputs and not isinstance(inputs[name], list):  # a list is a link, not a widget value
                values[index] = inputs[name]
    return out


def _upload_button_after(definition: dict) -> str | None:
    """The widget whose value the upload button's follows: the frontend adds the button as the last required
    input of a node with an upload option (LoadImage: after image; LoadImageMask: after channel)."""
    specs = definition.get("input", {}).get("required", {}) or {}
    if not any(_options(spec).get(o) for spec in specs.values() for o in UPLOAD_OPTIONS):
        return None
    required = [name for name, _, _ in widget_inputs(definition) if name in specs]
    return required[-1] if required else None


def _links(workflow: dict) -> dict[int, tuple[int, int]]:
    """link id -> (origin node id, origin slot); links are lists or (newer files) objects. A link's own type is
    not needed: the frontend resolves by the types of the inputs and outputs at its ends."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            out[link[0]] = (link[1], link[2])
    return out


class _Removed:
    """A link that resolves to a node the prompt leaves out (a muted one): the frontend drops the input."""


REMOVED = _Removed()
Resolved = tuple | _Removed | None  # (node id, slot), (literal,), REMOVED, or None (resolves to nothing)


def fits(type_a: object, type_b: object) -> bool:
    """LiteGraph.isValidConnection: "*" and "" fit anything; "A,B" lists fit when one member fits; case-blind."""
    a = 0 if type_a in ("", "*") else type_a
    b = 0 if type_b in ("", "*") else type_b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(fits(x, y) for x in a.split(",") for y in b.split(","))


def bypass_input(node: dict, slot: int, kind: object) -> int:
    """The index of the input a bypassed node passes to its output `slot` for an input of type `kind`, or -1."""
    inputs = node.get("inputs") or []
    if kind in ("*", ""):
        return slot if len(inputs) > slot else 0
    outputs = node.get("outputs") or []
    output_type = outputs[slot].get("type", "*") if slot < len(outputs) else "*"
    if slot < len(inputs) and fits(inputs[slot].get("type"), output_type) and fits(inputs[slot].get("type"), kind):
        return slot
    for index, candidate in enumerate(inputs):
        if candidate.get("type") == kind:
            return index
    for index, candidate in enumerate(inputs):
        if fits(candidate.get("type"), output_type) and fits(candidate.get("type"), kind):
            return index
    return -1


def to_api(workflow: dict, definitions: Mapping[str, dict]) -> dict:
    """The API prompt of a UI-format workflow (see the module docstring for what is resolved how)."""
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ConversionError("this workflow holds subgraphs; convert it in ComfyUI (Export (API)) and run that file")
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    links = _links(workflow)

    def from_input(node: dict, index: int, kind: object, seen: set) -> Resolved:
        """Where input `index` of `node` comes from, resolved for an input of type `kind` (None: its own type)."""
        inputs = node.get("inputs") or []
        if index >= len(inputs) or inputs[index].get("link") not in links:
            return None
        origin, slot = links[inputs[index]["link"]]
        return from_output(origin, slot, inputs[index].get("type", "*") if kind is None else kind, seen)

    def from_output(node_id: Any, slot: int, kind: object, seen: set) -> Resolved:
        """What output `slot` of a node gives an input of type `kind`: the frontend's resolveOutput."""
        node = nodes.get(node_id)
        if node is None:
            return None
        if (node_id, slot) in seen:
            raise ConversionError(f"node {node_id}: its links go round in a circle through bypassed nodes or reroutes")
        seen.add((node_id, slot))
        if node.get("mode") == BYPASSED:
            index = bypass_input(node, slot, kind)
            return from_input(node, index, None, seen) if index >= 0 else None
        if node.get("type") == "Reroute":
            return from_input(node, slot, kind, seen)
        if node.get("type") == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return (values[0],) if values else None
        if node.get("type") in FRONTEND_ONLY:  # notes: virtual nodes without inputs resolve to nothing
            return None
        return REMOVED if node.get("mode") == MUTED else (node_id, slot)

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
        for index, slot in enumerate(node.get("inputs", []) or []):
            found = from_input(node, index, None, set())
            name = slot.get("name") if not isinstance(slot.get("widget"), dict) else slot["widget"].get("name")
            if found is REMOVED:
                inputs.pop(name, None)  # linked to a muted node: left out, widget value and all, as the frontend does
            elif isinstance(found, tuple):
                inputs[name] = found[0] if len(found) == 1 else [str(found[0]), found[1]]
        title = node.get("title") or definition.get("display_name") or kind
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt


def is_ui_workflow(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)
