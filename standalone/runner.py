"""An API-format ComfyUI workflow of the pack's nodes -> its outputs, run in-process without a ComfyUI server.

It validates every input the way ComfyUI's executor does (required inputs, links, types, min/max,
combo lists, VALIDATE_INPUTS) before any node runs, so a bad value is refused before a model loads,
then runs the nodes that the output nodes depend on, in dependency order. `check` validates once and gives a
CheckedPrompt, which `run` takes without validating it again.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..sampling.parameters import number_problem

log = logging.getLogger(__name__)


class WorkflowError(ValueError):
    """The workflow cannot run as given; the message lists every problem found."""


@dataclass(frozen=True)
class CheckedPrompt:
    """A prompt that passed `validate` with these node classes."""
    prompt: Mapping[str, dict]
    classes: Mapping[str, type]


def is_link(value: Any) -> bool:
    """An input that links to another node's output: [node id, output index]."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _check_constant(name: str, value: Any, spec: tuple) -> str | None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return None if value in kind else f"{name}: {value!r} is not one of {kind[:20]}"
    if kind in ("INT", "FLOAT"):
        # Integers stay integers end to end (a float cannot hold every seed up to 2^64 - 1).
        return number_problem(name, value, options.get("min"), options.get("max"), whole=kind == "INT")
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}: {value!r} is not a boolean"
    elif kind == "STRING" and not isinstance(value, str):
        return f"{name}: {value!r} is not a string"
    return None


def structure_problems(prompt: Mapping[str, Any], classes: Mapping[str, type]) -> list[str]:
    """Nodes that are not nodes, or of a type this runner does not know."""
    errors = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs", {}), dict):
            errors.append(f"node {node_id}: not a node (an API-format node is {{\"class_type\": ..., "
                          "\"inputs\": {...}})")
        elif node.get("class_type") not in classes:
            errors.append(f"node {node_id}: unknown node type {node.get('class_type')!r} (this runner knows "
                          f"{', '.join(sorted(classes))})")
    return errors


def validate(prompt: Mapping[str, dict], classes: Mapping[str, type]) -> list[str]:
    """Every problem of the workflow, as 'node <id> (<class>): <input>: <what is wrong>'."""
    errors = structure_problems(prompt, classes)
    for node_id, node in prompt.items():
        cls = classes.get(node.get("class_type")) if isinstance(node, dict) else None
        if cls is None or not isinstance(node.get("inputs", {}), dict):
            continue
        class_type = node["class_type"]
        where = f"node {node_id} ({class_type})"
        spec = cls.INPUT_TYPES()
        inputs = node.get("inputs", {})
        required, optional = spec.get("required", {}), spec.get("optional", {})
        custom_check = getattr(cls, "VALIDATE_INPUTS", None)
        # As ComfyUI does: inputs that VALIDATE_INPUTS takes are checked by it alone.
        custom_checked = set(inspect.signature(custom_check).parameters) if custom_check is not None else set()
        constants: dict[str, Any] = {}
        for name, input_spec in {**required, **optional}.items():
            if name not in inputs:
                if name in required:
                    errors.append(f"{where}: required input {name!r} is missing")
                continue
            value = inputs[name]
            if is_link(value):
                if value[0] not in prompt:
                    errors.append(f"{where}: {name} is linked to node {value[0]}, which is not in the workflow")
                continue
            constants[name] = value
            problem = None if name in custom_checked else _check_constant(name, value, input_spec)
            if problem:
                errors.append(f"{where}: {problem}")
        if custom_check is not None:
            # As ComfyUI does: a linked input is passed as None (its value is known only at run time).
            result = custom_check(**{k: constants.get(k) for k in custom_checked if k in inputs})
            if result is not True:  # the pack's nodes give one problem a line
                errors += [f"{where}: {line}" for line in str(result).splitlines() if line.strip()] or \
                    [f"{where}: {result}"]
    return errors


def _order(prompt: Mapping[str, dict], classes: Mapping[str, type]) -> list[str]:
    """Nodes the output nodes need, each after the nodes it reads from."""
    outputs = [n for n, node in prompt.items() if getattr(classes[node["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("the workflow has no output node (e.g. Krea Save Image)")
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(node_id: str) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "visiting":
            raise WorkflowError(f"the workflow has a cycle through node {node_id}")
        state[node_id] = "visiting"
        for value in prompt[node_id].get("inputs", {}).values():
            if is_link(value):
                visit(value[0])
        state[node_id] = "done"
        order.append(node_id)

    for node_id in outputs:
        visit(node_id)
    return order


def check(prompt: Mapping[str, dict], classes: Mapping[str, type]) -> CheckedPrompt:
    """The prompt, validated; WorkflowError listing every problem."""
    errors = validate(prompt, classes)
    if errors:
        raise WorkflowError("the workflow cannot run:\n  " + "\n  ".join(errors))
    return CheckedPrompt(prompt, classes)


def _needed_by(prompt: Mapping[str, dict], targets: Collection[str]) -> set[str]:
    """The targets and every node they read from, directly or not."""
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        node_id = todo.pop()
        if node_id not in needed:
            needed.add(node_id)
            todo += [v[0] for v in prompt[node_id].get("inputs", {}).values() if is_link(v)]
    return needed


def run(prompt: Mapping[str, dict] | CheckedPrompt, classes: Mapping[str, type] | None = None,
        extra_pnginfo: dict | None = None, on_node: Callable[[str, str], None] | None = None,
        only_for: Collection[str] | None = None) -> dict[str, dict]:
    """Run a CheckedPrompt, or validate a prompt with `classes` and run it; returns the `ui` dicts of the nodes
    that gave one, by node id. `on_node(id, class)` is told as each node starts. `only_for`: run only these nodes
    and what they need, in the order of the whole run (a sequence-parallel helper process runs the samplers)."""
    if not isinstance(prompt, CheckedPrompt):
        if classes is None:
            raise TypeError("run() needs the node classes to validate a prompt with")
        prompt = check(prompt, classes)
    prompt, classes = prompt.prompt, prompt.classes
    results: dict[str, tuple] = {}
    uis: dict[str, dict] = {}
    order = _order(prompt, classes)
    if only_for is not None:
        needed = _needed_by(prompt, only_for)
        order = [node_id for node_id in order if node_id in needed]
    for node_id in order:
        node = prompt[node_id]
        cls = classes[node["class_type"]]
        kwargs = {}
        for name, value in node.get("inputs", {}).items():
            kwargs[name] = results[value[0]][value[1]] if is_link(value) else value
        declared = {**cls.INPUT_TYPES().get("required", {}), **cls.INPUT_TYPES().get("optional", {})}
        kwargs = {k: v for k, v in kwargs.items() if k in declared}
        for name, kind in cls.INPUT_TYPES().get("hidden", {}).items():
            kwargs[name] = {"PROMPT": dict(prompt), "EXTRA_PNGINFO": extra_pnginfo,
                            "UNIQUE_ID": node_id}.get(kind)
        log.info("running node %s (%s)", node_id, node["class_type"])
        if on_node is not None:
            on_node(node_id, node["class_type"])
        out = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(out, dict):
            if "ui" in out:
                uis[node_id] = out["ui"]
            out = out.get("result", ())
        results[node_id] = tuple(out)
    return uis
