"""What the UI-workflow conversion reads of a node's definition when no server is asked: the /object_info-shaped
definitions of node classes (local_definitions), the inputs shown as widgets and their order (widget_inputs), and
which extra widgets the frontend inserts between the saved values: a seed's "control after generate" and an
image's upload button (widget_values)."""
from __future__ import annotations

from comfyui_krea.standalone.ui_workflow import is_ui_workflow, local_definitions, widget_inputs, widget_values


class Blend:
    """A node class as ComfyUI declares one: required, optional and hidden inputs, and its outputs."""
    RETURN_TYPES = ("LATENT", "MASK")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "factor": ("FLOAT", {"default": 0.5}),
                             "mode": (["normal", "add"],)},
                "optional": {"mask": ("MASK",)},
                "hidden": {"prompt": "PROMPT"}}


class Sink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {})}}


def test_local_definitions_are_shaped_as_comfyuis_object_info():
    definitions = local_definitions({"Blend": Blend, "Sink": Sink}, {"Blend": "Blend Latents"})
    assert definitions["Blend"] == {
        "input": {"required": {"samples": ("LATENT",), "factor": ("FLOAT", {"default": 0.5}),
                               "mode": (["normal", "add"],)},
                  "optional": {"mask": ("MASK",)}, "hidden": {"prompt": "PROMPT"}},
        "input_order": {"required": ["samples", "factor", "mode"], "optional": ["mask"]},
        "output": ["LATENT", "MASK"], "display_name": "Blend Latents", "name": "Blend"}
    assert definitions["Sink"] == {  # no outputs, no display name given: the class name
        "input": {"required": {"text": ("STRING", {})}, "optional": {}, "hidden": {}},
        "input_order": {"required": ["text"], "optional": []}, "output": [], "display_name": "Sink", "name": "Sink"}


def test_widgets_are_the_value_inputs_in_the_definitions_input_order():
    definition = {"input": {"required": {"b": ["INT", {}], "a": [["x", "y"]], "model": ["MODEL"],
                                         "linked": ["FLOAT", {"forceInput": True}]},
                            "optional": {"c": ["STRING", {"multiline": True}]}},
                  "input_order": {"required": ["a", "b", "model", "linked", "gone"], "optional": ["c"]}}
    assert widget_inputs(definition) == [("a", {}, "COMBO"), ("b", {}, "INT"), ("c", {"multiline": True}, "STRING")]
    del definition["input_order"]  # older servers: the inputs' own order
    assert [name for name, _, _ in widget_inputs(definition)] == ["b", "a", "c"]
    assert widget_inputs({}) == []


def definition_of(required: dict, **more) -> dict:
    return {"input": {"required": required, **more}, "input_order": {"required": list(required)}}


def test_a_control_value_follows_only_seeds_and_numbers_that_ask_for_one():
    definition = definition_of({"seed": ["INT", {}], "noise_seed": ["INT", {}], "steps": ["INT", {}],
                                "scale": ["FLOAT", {"control_after_generate": True}], "mode": [["fixed", "x"]],
                                "other": [["fixed", "x"]]})
    values = [1, "randomize", 2, "increment", 3, 0.5, "decrement", "x", "fixed"]
    assert widget_values({"widgets_values": values}, definition) == {
        "seed": 1, "noise_seed": 2, "steps": 3, "scale": 0.5, "mode": "x", "other": "fixed"}
    # a number that does not ask for one, and a choice, keep a following "fixed" as the next widget's value
    plain = definition_of({"steps": ["INT", {}], "mode": [["fixed", "x"]], "other": [["fixed", "x"]]})
    assert widget_values({"widgets_values": [3, "fixed", "fixed"]}, plain) == {
        "steps": 3, "mode": "fixed", "other": "fixed"}
    off = definition_of({"seed": ["INT", {"control_after_generate": False}], "mode": [["fixed", "x"]]})
    assert widget_values({"widgets_values": [5, "fixed"]}, off) == {"seed": 5, "mode": "fixed"}


def test_the_upload_button_value_is_skipped_only_for_a_node_with_an_upload_option():
    upload = definition_of({"image": [["a.png"], {"image_upload": True}], "channel": [["red", "green"]]})
    assert widget_values({"widgets_values": ["a.png", "green", "image"]}, upload) == {"image": "a.png",
                                                                                      "channel": "green"}
    assert widget_values({"widgets_values": ["a.png", "green"]}, upload) == {"image": "a.png", "channel": "green"}
    plain = definition_of({"image": [["a.png"], {}], "channel": [["red", "green"]], "extra": [["image", "x"]]})
    assert widget_values({"widgets_values": ["a.png", "green", "image"]}, plain) == {
        "image": "a.png", "channel": "green", "extra": "image"}
    # the button follows the last required widget even with optional widgets after it
    with_optional = {"input": {"required": {"image": [["a.png"], {"image_upload": True}]},
                               "optional": {"note": ["STRING", {}]}},
                     "input_order": {"required": ["image"], "optional": ["note"]}}
    assert widget_values({"widgets_values": ["a.png", "image", "hi"]}, with_optional) == {"image": "a.png",
                                                                                          "note": "hi"}


def test_fewer_saved_values_than_widgets_fill_the_first_ones():
    definition = definition_of({"a": ["INT", {}], "b": ["INT", {}], "c": ["INT", {}]})
    assert widget_values({"widgets_values": [1, 2]}, definition) == {"a": 1, "b": 2}
    assert widget_values({"widgets_values": {"b": 2, "z": 9}}, definition) == {"b": 2}
    assert widget_values({}, definition) == {}


def test_only_a_graph_with_a_node_list_is_a_ui_workflow():
    assert is_ui_workflow({"nodes": [], "links": []})
    assert not is_ui_workflow({"3": {"class_type": "KreaSampler", "inputs": {}}})  # an API prompt
    assert not is_ui_workflow({"nodes": {}}) and not is_ui_workflow([])


def test_a_seed_saved_last_without_its_control_value_and_a_button_anchor_before_optional_widgets():
    last_seed = definition_of({"steps": ["INT", {}], "seed": ["INT", {}]})
    assert widget_values({"widgets_values": [4, 5]}, last_seed) == {"steps": 4, "seed": 5}
    with_optional = {"input": {"required": {"image": [["a.png"], {"image_upload": True}]},
                               "optional": {"note": ["STRING", {}]}},
                     "input_order": {"required": ["image"], "optional": ["note"]}}
    # saved without the button's value: the next value is the optional widget's
    assert widget_values({"widgets_values": ["a.png", "hi"]}, with_optional) == {"image": "a.png", "note": "hi"}


def test_definitions_without_inputs_or_with_an_upload_option_on_a_linked_input_have_no_button():
    assert widget_values({"widgets_values": [1]}, {}) == {}
    linked = definition_of({"image": ["IMAGE", {"image_upload": True}], "mode": [["a", "b"]]})
    assert widget_values({"widgets_values": ["b", "a"]}, linked) == {"mode": "b"}
    only_linked = definition_of({"image": ["IMAGE", {"image_upload": True}]})
    assert widget_values({"widgets_values": ["image"]}, only_linked) == {}
