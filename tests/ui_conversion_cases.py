"""UI workflows with bypassed, muted and rerouted nodes, built from the shipped image-to-image file by graph surgery:
what tests/test_ui_workflow.py checks against the frontend's rule and tests/test_browser.py converts in the real
frontend (ComfyUI 0.3.64's frontend package) to compare with the pack's converter.

Every case uses the pack's nodes and ComfyUI core nodes only (ImageInvert, ImageBlend, LatentBlend, ImageToMask,
SetLatentNoiseMask, PrimitiveInt, Reroute), found by type, so a change to the shipped file's ids keeps the cases.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent.parent / "workflows" / "krea_image_to_image.json"
MUTED, BYPASSED = 2, 4
OUTPUTS = {"ImageInvert": ["IMAGE"], "ImageBlend": ["IMAGE"], "LatentBlend": ["LATENT"], "ImageToMask": ["MASK"],
           "SetLatentNoiseMask": ["LATENT"], "PrimitiveInt": ["INT"], "Reroute": ["*"], "LoadImage": ["IMAGE", "MASK"]}
INPUTS = {"ImageInvert": [("image", "IMAGE")], "ImageBlend": [("image1", "IMAGE"), ("image2", "IMAGE")],
          "LatentBlend": [("samples1", "LATENT"), ("samples2", "LATENT")], "ImageToMask": [("image", "IMAGE")],
          "SetLatentNoiseMask": [("samples", "LATENT"), ("mask", "MASK")], "PrimitiveInt": [], "Reroute": [("", "*")],
          "LoadImage": []}
WIDGETS = {"ImageBlend": [0.5, "normal"], "LatentBlend": [0.5], "ImageToMask": ["red"], "PrimitiveInt": [7, "fixed"],
           "LoadImage": ["example.png", "image"]}


class Graph:
    """A UI workflow being rewired: nodes found by type, links made and moved as the frontend stores them."""

    def __init__(self) -> None:
        self.data = copy.deepcopy(json.loads(SHIPPED.read_text()))

    def node(self, kind: str) -> dict:
        """The shipped file's one node of this type."""
        return next(n for n in self.data["nodes"] if n["type"] == kind)

    def add(self, kind: str, mode: int = 0) -> dict:
        node_id = max(n["id"] for n in self.data["nodes"]) + 1
        self.data["last_node_id"] = node_id
        node = {"id": node_id, "type": kind, "pos": [100 + 40 * node_id, 600], "size": [220, 80], "flags": {},
                "order": node_id, "mode": mode, "properties": {"Node name for S&R": kind},
                "inputs": [{"name": name, "type": kind_, "link": None} for name, kind_ in INPUTS[kind]],
                "outputs": [{"name": t if t != "*" else "", "type": t, "links": []} for t in OUTPUTS[kind]]}
        if kind in WIDGETS:
            node["widgets_values"] = list(WIDGETS[kind])
        self.data["nodes"].append(node)
        return node

    def connect(self, origin: dict, slot: int, target: dict, name: str, widget: str | None = None) -> None:
        """origin's output `slot` into target's input `name` (replacing its link); `widget`: the input of a widget."""
        inputs = target["inputs"]
        if widget is not None and not any(i["name"] == name for i in inputs):
            inputs.append({"name": name, "type": widget, "widget": {"name": name}, "link": None})
        index, entry = next((k, i) for k, i in enumerate(inputs) if i["name"] == name)
        self.disconnect(target, name)
        link_id = max([link[0] for link in self.data["links"]] + [0]) + 1
        self.data["last_link_id"] = link_id
        kind = origin["outputs"][slot]["type"]
        self.data["links"].append([link_id, origin["id"], slot, target["id"], index, kind if kind != "*" else
                                   entry["type"]])
        entry["link"] = link_id
        origin["outputs"][slot].setdefault("links", []).append(link_id)

    def disconnect(self, target: dict, name: str) -> None:
        entry = next(i for i in target["inputs"] if i["name"] == name)
        if entry.get("link") is None:
            return
        link = next(link for link in self.data["links"] if link[0] == entry["link"])
        self.data["links"].remove(link)
        origin = next(n for n in self.data["nodes"] if n["id"] == link[1])
        origin["outputs"][link[2]]["links"].remove(link[0])
        entry["link"] = None


def sampler_bypassed(g: Graph) -> None:
    """Krea Sampler (MODEL, CONDITIONING, LATENT in; LATENT out) bypassed: the decoder gets the encoded image."""
    g.node("KreaSampler")["mode"] = BYPASSED


def same_index_preferred(g: Graph) -> None:
    """LatentBlend bypassed with both inputs LATENT: the one at the output's index (samples1) passes."""
    blend = g.add("LatentBlend", BYPASSED)
    g.connect(g.node("KreaEncodeImage"), 0, blend, "samples1")
    g.connect(g.node("KreaSampler"), 0, blend, "samples2")
    g.connect(blend, 0, g.node("KreaDecode"), "samples")


def unconnected_choice_gives_nothing(g: Graph) -> None:
    """The same with samples1 unconnected: the frontend still chooses it, so the decoder's samples is absent."""
    blend = g.add("LatentBlend", BYPASSED)
    g.connect(g.node("KreaSampler"), 0, blend, "samples2")
    g.connect(blend, 0, g.node("KreaDecode"), "samples")


def chain_of_bypassed_nodes(g: Graph) -> None:
    """LoadImage -> ImageInvert (bypassed) -> ImageBlend (bypassed, image1; image2 from a second LoadImage) ->
    Krea Encode Image: the first LoadImage's image."""
    invert, blend, other = g.add("ImageInvert", BYPASSED), g.add("ImageBlend", BYPASSED), g.add("LoadImage")
    g.connect(g.node("LoadImage"), 0, invert, "image")
    g.connect(invert, 0, blend, "image1")
    g.connect(other, 0, blend, "image2")
    g.connect(blend, 0, g.node("KreaEncodeImage"), "image")


def no_input_of_the_type(g: Graph) -> None:
    """ImageToMask (IMAGE in, MASK out) bypassed into SetLatentNoiseMask's mask: nothing fits, the input is absent."""
    to_mask, noise_mask = g.add("ImageToMask", BYPASSED), g.add("SetLatentNoiseMask")
    g.connect(g.node("LoadImage"), 0, to_mask, "image")
    g.connect(g.node("KreaEncodeImage"), 0, noise_mask, "samples")
    g.connect(to_mask, 0, noise_mask, "mask")
    g.connect(noise_mask, 0, g.node("KreaSampler"), "latent")


def reroutes_around_a_bypassed_node(g: Graph) -> None:
    """LoadImage -> Reroute -> ImageInvert (bypassed) -> Reroute -> Krea Encode Image."""
    first, invert, second = g.add("Reroute"), g.add("ImageInvert", BYPASSED), g.add("Reroute")
    g.connect(g.node("LoadImage"), 0, first, "")
    g.connect(first, 0, invert, "image")
    g.connect(invert, 0, second, "")
    g.connect(second, 0, g.node("KreaEncodeImage"), "image")


def reroute_after_a_bypassed_sampler(g: Graph) -> None:
    """Krea Sampler bypassed -> Reroute -> Krea Decode: the reroute asks for the decoder's LATENT, not for any type
    (which would pass the sampler's first input, the MODEL), so the decoder gets the encoded image."""
    reroute = g.add("Reroute")
    g.node("KreaSampler")["mode"] = BYPASSED
    g.connect(g.node("KreaSampler"), 0, reroute, "")
    g.connect(reroute, 0, g.node("KreaDecode"), "samples")


def muted_sources(g: Graph) -> None:
    """A muted PrimitiveInt into the sampler's seed widget (the seed is left out, value and all), and a muted
    ImageInvert behind a bypassed ImageBlend into the safety check (its images is left out)."""
    seed = g.add("PrimitiveInt", MUTED)
    g.connect(seed, 0, g.node("KreaSampler"), "seed", widget="INT")
    invert, blend = g.add("ImageInvert", MUTED), g.add("ImageBlend", BYPASSED)
    g.connect(g.node("KreaDecode"), 0, invert, "image")
    g.connect(invert, 0, blend, "image1")
    g.connect(g.node("KreaDecode"), 0, blend, "image2")
    g.connect(blend, 0, g.node("KreaSafetyCheck"), "images")


CASES: dict[str, Callable[[Graph], None]] = {f.__name__: f for f in (
    sampler_bypassed, same_index_preferred, unconnected_choice_gives_nothing, chain_of_bypassed_nodes,
    no_input_of_the_type, reroutes_around_a_bypassed_node, reroute_after_a_bypassed_sampler, muted_sources)}


def case(name: str) -> Graph:
    graph = Graph()
    CASES[name](graph)
    return graph
