"""An API workflow and a list of LoRAs (file name in the loras folder, strength) -> the same workflow with a chain of
LoraLoaderModelOnly nodes between the node that outputs the transformer and every node that used that output.

This is the one shape LoRAs take in a workflow, whoever runs it: inside ComfyUI its own LoraLoaderModelOnly merges
them with ComfyUI's LoRA code; outside it the standalone runner's node of the same name and inputs does, with the
pack's engine (model_loader/lora). The command line's `--lora` writes it, and so can fal's LoRA endpoints (their
`loras: [{path, scale}]` field), so that both servers and the command line run the same workflow.
"""
from __future__ import annotations

from collections.abc import Sequence

LORA_LOADER = "LoraLoaderModelOnly"  # ComfyUI's core node: inputs model, lora_name, strength_model -> MODEL
# Node types whose output 0 is the FLUX transformer (the pack's loader, ComfyUI's own diffusion model loader).
MODEL_SOURCES = ("KreaModelLoader", "UNETLoader")
STRENGTH_RANGE = (-100.0, 100.0)  # LoraLoaderModelOnly's strength_model


def _free_ids(prompt: dict, count: int) -> list[str]:
    numbers = [int(k) for k in prompt if isinstance(k, str) and k.isdigit()]
    first = max(numbers, default=0) + 1
    return [str(first + i) for i in range(count)]


def add_loras(prompt: dict, loras: Sequence[tuple[str, float]]) -> list[str]:
    """Put one LoraLoaderModelOnly per LoRA, in order, after every model source of the API `prompt` (in place);
    returns the new node ids. ValueError when there are LoRAs but no node outputs a transformer."""
    if not loras:
        return []
    sources = [node_id for node_id, node in prompt.items() if node.get("class_type") in MODEL_SOURCES]
    if not sources:
        raise ValueError(f"LoRAs need a model loader in the workflow ({' or '.join(MODEL_SOURCES)}) to follow; "
                         "this workflow has none")
    added: list[str] = []
    for source in sources:
        users = [(node, name) for node in prompt.values() for name, value in node.get("inputs", {}).items()
                 if value == [source, 0]]
        previous: list = [source, 0]
        for node_id, (name, strength) in zip(_free_ids(prompt, len(loras)), loras):
            prompt[node_id] = {"class_type": LORA_LOADER, "_meta": {"title": f"LoRA {name}"},
                               "inputs": {"model": previous, "lora_name": name, "strength_model": strength}}
            previous = [node_id, 0]
            added.append(node_id)
        for node, name in users:
            node["inputs"][name] = previous
    return added
