"""ComfyUI's answer to a refused prompt (its node_errors) -> each problem once, under the input it is about.

ComfyUI 0.3.64 attaches the text a node's VALIDATE_INPUTS returns to every input that function takes
(execution.py, validate_inputs: one "custom_validation_failed" error per taken input, details "<input> - <text>"),
so a node that checks four inputs reports one problem four times. The pack's nodes put each problem on a line of
its own that starts with the input it is about; `node_problems` reads such a text once and gives each line under
its input. The pack's own readers of node_errors use it: the fal routes inside ComfyUI (`refusal_text`) and
`run --server`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CUSTOM = "custom_validation_failed"


@dataclass(frozen=True)
class Problem:
    node_id: str
    class_type: str
    input: str | None  # the input it is about (None: the node as a whole)
    text: str


def problem_text(error: dict) -> str:
    """One of ComfyUI's own errors: {"message": "Value 99 bigger than max of 50", "details":
    "num_inference_steps"} -> "num_inference_steps: Value 99 bigger than max of 50"."""
    message, details = error.get("message", ""), error.get("details", "")
    return f"{details}: {message}" if details and message and details not in message else (details or message)


def about(line: str, inputs: list[str]) -> str | None:
    """The input among `inputs` a line starts with ("width must be ...", "checker_name: ..."), else None."""
    for name in inputs:
        if line.startswith(name) and line[len(name):len(name) + 1] in (":", " "):
            return name
    return None


def custom_problems(node_id: str, class_type: str, errors: list[dict]) -> list[Problem]:
    """The distinct lines of a node's custom validation texts, each under the input it starts with (a line that
    names none of the inputs is about the node)."""
    carriers: dict[str, list[str]] = {}  # text -> the inputs ComfyUI attached it to, in order
    for error in errors:
        name = (error.get("extra_info") or {}).get("input_name") or ""
        details = error.get("details", "")
        carriers.setdefault(details[len(name) + 3:] if details.startswith(f"{name} - ") else "", []).append(name)
    problems: list[Problem] = []
    for text, inputs in carriers.items():
        lines = [line for line in text.splitlines() if line.strip()]
        found = [Problem(node_id, class_type, about(line, inputs), line) for line in lines] or \
            [Problem(node_id, class_type, None, f"{', '.join(inputs)}: the node's own check failed")]
        problems += [problem for problem in found if problem not in problems]
    return problems


def node_problems(node_errors: Mapping[str, dict]) -> list[Problem]:
    """Every problem of a prompt's node_errors, once: ComfyUI's own errors as they are, custom validation texts
    line by line under their inputs."""
    problems: list[Problem] = []
    for node_id, entry in (node_errors or {}).items():
        class_type = entry.get("class_type", "")
        errors = entry.get("errors", [])
        custom = [e for e in errors if e.get("type") == CUSTOM]
        for error in errors:
            if error.get("type") != CUSTOM:
                name = (error.get("extra_info") or {}).get("input_name")
                problems.append(Problem(node_id, class_type, name, problem_text(error)))
        problems += custom_problems(node_id, class_type, custom)
    return problems


def refusal_text(error: Mapping | None, node_errors: Mapping[str, dict]) -> str:
    """ComfyUI's validation answer (validate_prompt's error and node_errors) as one line per problem."""
    lines = [f"{error.get('message', '')}: {error.get('details', '')}".strip(": ")] if error else []
    lines += [f"node {p.node_id} ({p.class_type}): {p.text}" for p in node_problems(node_errors)]
    return "; ".join(lines) or "ComfyUI refused the workflow"
