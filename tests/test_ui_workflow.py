"""UI-format workflows -> API prompts as the frontend's graphToPrompt makes them: the shipped files equal their API
forms, and links, widget values, control_after_generate, upload buttons, bypassed and muted nodes, reroutes,
primitive nodes and groups each resolve as the frontend resolves them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_krea.nodes import NODE_DISPLAY_NAME_MAPPINGS
from comfyui_krea.standalone.node_classes import PACK_CLASSES
from comfyui_krea.standalone.ui_workflow import (
    ConversionError,
    local_definitions,
    to_api,
    widget_values,
    with_values,
)

ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS = local_definitions(PACK_CLASSES, NODE_DISPLAY_NAME_MAPPINGS)
# The parts of ComfyUI's /object_info these tests use (shapes as the server sends them).
DEFINITIONS["LoadImage"] = {"input": {"required": {"image": [["example.png", "other.png"], {"image_upload": True}]}},
                            "input_order": {"required": ["image"]}, "display_name": "Load Image"}
DEFINITIONS["LoadImageMask"] = {
    "input": {"required": {"image": [["example_mask.png"], {"image_upload": True}],
                           "channel": [["alpha", "red", "green", "blue"]]}},
    "input_order": {"required": ["image", "channel"]}, "display_name": "Load Image (as Mask)"}
DEFINITIONS["ImageInvert"] = {"input": {"required": {"image": ["IMAGE", {}]}}, "input_order": {"required": ["image"]},
                              "display_name": "Invert Image"}
DEFINITIONS["ImageBlend"] = {"input": {"required": {"image1": ["IMAGE", {}], "image2": ["IMAGE", {}],
                                                    "blend_factor": ["FLOAT", {"default": 0.5}],
                                                    "blend_mode": [["normal", "multiply"], {}]}},
                             "input_order": {"required": ["image1", "image2", "blend_factor", "blend_mode"]}}
DEFINITIONS["LatentBlend"] = {"input": {"required": {"samples1": ["LATENT"], "samples2": ["LATENT"],
                                                     "blend_factor": ["FLOAT", {"default": 0.5}]}},
                              "input_order": {"required": ["samples1", "samples2", "blend_factor"]}}
DEFINITIONS["ImageToMask"] = {"input": {"required": {"image": ["IMAGE"], "channel": [["red", "green"]]}},
                              "input_order": {"required": ["image", "channel"]}}
DEFINITIONS["SetLatentNoiseMask"] = {"input": {"required": {"samples": ["LATENT"], "mask": ["MASK"]}},
                                     "input_order": {"required": ["samples", "mask"]}}
DEFINITIONS["PrimitiveInt"] = {"input": {"required": {"value": ["INT", {"control_after_generate": True}]}},
                               "input_order": {"required": ["value"]}}


@pytest.mark.parametrize("name", ["krea_text_to_image", "krea_image_to_image", "krea_inpainting"])
def test_the_shipped_ui_files_equal_their_api_forms(name):
    ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    api = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    assert to_api(ui, DEFINITIONS) == api


def node(node_id, kind, widgets=None, inputs=(), mode=0, title=None):
    out = {"id": node_id, "type": kind, "mode": mode, "inputs": [dict(i) for i in inputs],
           "widgets_values": widgets if widgets is not None else []}
    if title:
        out["title"] = title
    return out


def text_to_image(extra_nodes=(), extra_links=(), decode_image_link=7, **changes):
    """The shipped text-to-image graph, as nodes and links the tests can rewire."""
    nodes = [
        node(1, "KreaModelLoader", ["m.safetensors", "default", "c.safetensors", "t.safetensors", "v.safetensors"]),
        node(2, "KreaTextEncode", ["a fox"], [{"name": "text_encoder", "type": "CLIP", "link": 1}]),
        node(3, "KreaSampler", ["custom", 64, 48, 2, 4.5, 42, "randomize", 1, "none", 0.95],
             [{"name": "model", "type": "MODEL", "link": 2}, {"name": "conditioning", "type": "CONDITIONING",
                                                             "link": 3}]),
        node(4, "KreaDecode", [], [{"name": "vae", "type": "VAE", "link": 5},
                                   {"name": "samples", "type": "LATENT", "link": 6}]),
        node(6, "KreaSaveImage", ["krea/krea", "png", 95], [{"name": "images", "type": "IMAGE",
                                                              "link": decode_image_link}]),
        *extra_nodes]
    links = [[1, 1, 1, 2, 0, "CLIP"], [2, 1, 0, 3, 0, "MODEL"], [3, 2, 0, 3, 1, "CONDITIONING"],
             [5, 1, 2, 4, 0, "VAE"], [6, 3, 0, 4, 1, "LATENT"], [7, 4, 0, 6, 0, "IMAGE"], *extra_links]
    for node_id, fields in changes.items():
        next(n for n in nodes if n["id"] == int(node_id[1:])).update(fields)
    return {"nodes": nodes, "links": links, "groups": [{"title": "a group", "bounding": [0, 0, 10, 10]}],
            "version": 0.4}


def test_widget_values_skip_the_seed_control_and_keep_their_order():
    prompt = to_api(text_to_image(), DEFINITIONS)
    assert prompt["3"]["inputs"] == {"image_size": "custom", "width": 64, "height": 48, "num_inference_steps": 2,
                                     "guidance_scale": 4.5, "seed": 42, "num_images": 1, "acceleration": "none",
                                     "strength": 0.95, "model": ["1", 0], "conditioning": ["2", 0]}
    assert prompt["3"]["_meta"] == {"title": "Krea Sampler"} and set(prompt) == {"1", "2", "3", "4", "6"}


def test_a_file_saved_without_the_control_value_still_lines_up():
    values = widget_values(node(3, "KreaSampler", ["custom", 64, 48, 2, 4.5, 42, 1, "high", 0.5]),
                           DEFINITIONS["KreaSampler"])
    assert values["seed"] == 42 and values["num_images"] == 1 and values["acceleration"] == "high"


def test_the_upload_button_value_is_skipped():
    prompt = to_api({"nodes": [node(7, "LoadImage", ["other.png", "image"])], "links": []}, DEFINITIONS)
    assert prompt["7"]["inputs"] == {"image": "other.png"}


def test_the_upload_button_follows_the_last_required_input():
    # The frontend adds the button as one more required input, after the node's own (LoadImageMask: channel).
    graph = {"nodes": [node(9, "LoadImageMask", ["m.png", "green", "image"]),
                       node(8, "LoadImageMask", ["m.png", "blue"])], "links": []}  # saved without the button
    prompt = to_api(graph, DEFINITIONS)
    assert prompt["9"]["inputs"] == {"image": "m.png", "channel": "green"}
    assert prompt["8"]["inputs"] == {"image": "m.png", "channel": "blue"}


def test_a_bypassed_node_passes_its_input_of_the_same_type_through():
    graph = text_to_image(extra_nodes=[node(9, "ImageInvert", [], [{"name": "image", "type": "IMAGE", "link": 7}],
                                            mode=4)],
                          extra_links=[[8, 9, 0, 6, 0, "IMAGE"]], decode_image_link=8)
    prompt = to_api(graph, DEFINITIONS)
    assert "9" not in prompt and prompt["6"]["inputs"]["images"] == ["4", 0]


def test_a_muted_node_is_left_out_with_the_inputs_it_fed():
    graph = text_to_image(extra_nodes=[node(9, "ImageInvert", [], [{"name": "image", "type": "IMAGE", "link": 7}],
                                            mode=2)],
                          extra_links=[[8, 9, 0, 6, 0, "IMAGE"]], decode_image_link=8)
    prompt = to_api(graph, DEFINITIONS)
    assert "9" not in prompt and "images" not in prompt["6"]["inputs"]


def test_reroutes_pass_through_and_a_primitive_writes_its_value():
    graph = text_to_image(
        extra_nodes=[node(10, "Reroute", None, [{"name": "", "type": "*", "link": 20}]),
                     node(11, "PrimitiveNode", [1234, "fixed"])],
        extra_links=[[20, 4, 0, 10, 0, "IMAGE"], [21, 10, 0, 6, 0, "IMAGE"], [22, 11, 0, 3, 2, "INT"]],
        decode_image_link=21)
    sampler = next(n for n in graph["nodes"] if n["id"] == 3)
    sampler["inputs"].append({"name": "seed", "type": "INT", "link": 22, "widget": {"name": "seed"}})
    prompt = to_api(graph, DEFINITIONS)
    assert "10" not in prompt and "11" not in prompt
    assert prompt["6"]["inputs"]["images"] == ["4", 0] and prompt["3"]["inputs"]["seed"] == 1234


def test_a_widget_turned_into_an_input_takes_its_link():
    graph = text_to_image(extra_nodes=[node(12, "KreaTextEncode", ["other"], [
        {"name": "text_encoder", "type": "CLIP", "link": 30}])],
        extra_links=[[30, 1, 1, 12, 0, "CLIP"]])
    prompt = to_api(graph, DEFINITIONS)
    assert prompt["12"]["inputs"] == {"prompt": "other", "text_encoder": ["1", 1]}


def test_titles_and_links_as_objects():
    graph = text_to_image(n3={"title": "My sampler"})
    graph["links"] = [{"id": k[0], "origin_id": k[1], "origin_slot": k[2], "target_id": k[3], "target_slot": k[4],
                       "type": k[5]} for k in graph["links"]]
    prompt = to_api(graph, DEFINITIONS)
    assert prompt["3"]["_meta"]["title"] == "My sampler" and prompt["4"]["inputs"]["samples"] == ["3", 0]


def test_unknown_node_types_and_subgraphs_are_refused():
    with pytest.raises(ConversionError, match="'SomePackNode', which this server does not have"):
        to_api({"nodes": [node(1, "SomePackNode")], "links": []}, DEFINITIONS)
    with pytest.raises(ConversionError, match="subgraphs"):
        to_api({"nodes": [], "links": [], "definitions": {"subgraphs": [{"id": "x"}]}}, DEFINITIONS)
    assert to_api({"nodes": [node(1, "Note", ["hello"])], "links": []}, DEFINITIONS) == {}


# ------------------------------------------- bypassed nodes with several inputs, chains, reroutes, muted sources
# The frontend's rule (ExecutableNodeDTO in frontend 1.27): a link out of a bypassed node continues from the input at
# the output's own index if its type fits, else the first input of exactly the wanted type, else the first that fits;
# an unconnected choice resolves to nothing (a widget keeps its value), a muted source drops the input altogether.
# tests/test_browser.py converts the same cases in the real frontend and compares.


def converted(name: str) -> tuple[dict, dict]:
    from ui_conversion_cases import case

    graph = case(name)
    return to_api(graph.data, DEFINITIONS), {n["type"]: str(n["id"]) for n in graph.data["nodes"]}


def test_a_bypassed_node_with_inputs_of_other_types_passes_the_one_of_the_outputs_type():
    prompt, ids = converted("sampler_bypassed")  # sampler: MODEL, CONDITIONING, LATENT in; LATENT out
    assert ids["KreaSampler"] not in prompt
    assert prompt[ids["KreaDecode"]]["inputs"]["samples"] == [ids["KreaEncodeImage"], 0]


def test_a_bypassed_node_prefers_the_input_at_its_outputs_index():
    prompt, ids = converted("same_index_preferred")
    assert prompt[ids["KreaDecode"]]["inputs"]["samples"] == [ids["KreaEncodeImage"], 0]


def test_a_bypassed_nodes_unconnected_choice_resolves_to_nothing():
    """samples1 is chosen though only samples2 is connected: the frontend does not look further."""
    prompt, ids = converted("unconnected_choice_gives_nothing")
    assert "samples" not in prompt[ids["KreaDecode"]]["inputs"]


def test_a_chain_of_bypassed_nodes_is_followed_to_the_real_source():
    from ui_conversion_cases import case

    graph = case("chain_of_bypassed_nodes")
    first_load = min(n["id"] for n in graph.data["nodes"] if n["type"] == "LoadImage")
    prompt = to_api(graph.data, DEFINITIONS)
    encode = next(node for node in prompt.values() if node["class_type"] == "KreaEncodeImage")
    assert encode["inputs"]["image"] == [str(first_load), 0]
    assert {node["class_type"] for node in prompt.values()} >= {"LoadImage"} and \
        not {"ImageInvert", "ImageBlend"} & {node["class_type"] for node in prompt.values()}


def test_a_bypassed_node_without_an_input_of_the_wanted_type_gives_nothing():
    prompt, ids = converted("no_input_of_the_type")
    assert prompt[ids["SetLatentNoiseMask"]]["inputs"] == {"samples": [ids["KreaEncodeImage"], 0]}


def test_reroutes_on_both_sides_of_a_bypassed_node():
    prompt, ids = converted("reroutes_around_a_bypassed_node")
    assert prompt[ids["KreaEncodeImage"]]["inputs"]["image"] == [ids["LoadImage"], 0]


def test_a_reroute_asks_a_bypassed_node_for_the_type_its_target_wants():
    prompt, ids = converted("reroute_after_a_bypassed_sampler")
    assert prompt[ids["KreaDecode"]]["inputs"]["samples"] == [ids["KreaEncodeImage"], 0]


def switch(node_id, links, output="*", mode=4):
    """A custom node (a "switch" of any type, as several packs have) with one IMAGE and one LATENT input."""
    out = node(node_id, "AnySwitch", [], [{"name": "image", "type": "IMAGE", "link": links[0]},
                                          {"name": "latent", "type": "LATENT", "link": links[1]}], mode=mode)
    out["outputs"] = [{"name": "out", "type": output}]
    return out


def test_a_bypassed_node_of_any_output_type_passes_the_input_its_target_wants():
    # Without the target's type the first input (the IMAGE) would fit the switch's "*" output.
    graph = text_to_image(extra_nodes=[node(7, "LoadImage", ["other.png", "image"]), switch(9, [30, 31])],
                          extra_links=[[30, 7, 0, 9, 0, "IMAGE"], [31, 3, 0, 9, 1, "LATENT"], [32, 9, 0, 4, 1, "*"]])
    graph["nodes"][3]["inputs"][1]["link"] = 32  # the decoder's samples from the switch
    prompt = to_api(graph, DEFINITIONS)
    assert prompt["4"]["inputs"]["samples"] == ["3", 0]


def test_an_input_without_a_type_takes_any_type():
    graph = text_to_image(extra_nodes=[node(7, "LoadImage", ["other.png", "image"]),
                                       switch(9, [30, 31], output="LATENT")],
                          extra_links=[[30, 7, 0, 9, 0, "IMAGE"], [31, 3, 0, 9, 1, "LATENT"], [32, 9, 0, 4, 1, "*"]])
    samples = graph["nodes"][3]["inputs"][1]
    samples["link"] = 32
    del samples["type"]
    # any type wanted: the input at the output's index (the IMAGE), as the frontend picks for a "*" input
    assert to_api(graph, DEFINITIONS)["4"]["inputs"]["samples"] == ["7", 0]


def test_a_bypassed_node_without_inputs_passes_nothing():
    graph = text_to_image(extra_nodes=[node(9, "PrimitiveInt", [7, "fixed"], [], mode=4)],
                          extra_links=[[30, 9, 0, 4, 1, "*"]])
    samples = graph["nodes"][3]["inputs"][1]
    samples.update(link=30, type="*")
    assert "samples" not in to_api(graph, DEFINITIONS)["4"]["inputs"]


def test_links_saved_as_objects_resolve_as_lists_do():
    graph = text_to_image()
    graph["links"] = [{"id": link[0], "origin_id": link[1], "origin_slot": link[2], "target_id": link[3],
                       "target_slot": link[4], "type": link[5]} for link in graph["links"]]
    assert to_api(graph, DEFINITIONS) == to_api(text_to_image(), DEFINITIONS)


def test_a_graph_without_links_or_nodes_converts():
    graph = {"nodes": [node(7, "LoadImage", ["other.png", "image"])]}
    assert to_api(graph, DEFINITIONS) == {"7": {"inputs": {"image": "other.png"}, "class_type": "LoadImage",
                                                "_meta": {"title": "Load Image"}}}
    assert to_api({"links": []}, DEFINITIONS) == {}


def test_an_input_fed_by_a_muted_node_is_left_out_widget_value_and_all():
    prompt, ids = converted("muted_sources")
    assert "seed" not in prompt[ids["KreaSampler"]]["inputs"]  # the widget's own 42 is not kept either
    assert "images" not in prompt[ids["KreaSafetyCheck"]]["inputs"]  # muted behind a bypassed node


def test_links_in_a_circle_through_bypassed_nodes_are_refused():
    graph = text_to_image(extra_nodes=[
        node(9, "ImageInvert", [], [{"name": "image", "type": "IMAGE", "link": 31}], mode=4),
        node(10, "ImageInvert", [], [{"name": "image", "type": "IMAGE", "link": 30}], mode=4)],
        extra_links=[[30, 9, 0, 10, 0, "IMAGE"], [31, 10, 0, 9, 0, "IMAGE"], [32, 9, 0, 6, 0, "IMAGE"]],
        decode_image_link=32)
    with pytest.raises(ConversionError, match="circle"):
        to_api(graph, DEFINITIONS)


def test_types_fit_as_litegraph_decides():
    from comfyui_krea.standalone.ui_workflow import fits

    assert fits("IMAGE", "IMAGE") and fits("*", "MASK") and fits("", "LATENT") and fits("image", "IMAGE")
    assert fits("IMAGE,MASK", "MASK") and not fits("IMAGE,MASK", "LATENT") and not fits("IMAGE", "MASK")


# ------------------------------------------------ the values a run used, written back into its UI workflow
# (what a saved image embeds, so that dropped on ComfyUI it restores them)

def test_the_prompts_widget_values_are_written_into_a_copy_of_the_workflow():
    graph = text_to_image()
    original = json.loads(json.dumps(graph))
    prompt = to_api(graph, DEFINITIONS)
    prompt["3"]["inputs"].update(seed=7, width=128, model=["5", 0])  # a link in the prompt is not a widget value
    del prompt["3"]["inputs"]["height"]  # a widget the prompt does not name keeps its value
    prompt["2"]["inputs"]["prompt"] = "a cat"
    out = with_values(graph, prompt, DEFINITIONS)
    assert graph == original  # the workflow given is left as it was
    assert out["nodes"][2]["widgets_values"] == ["custom", 128, 48, 2, 4.5, 7, "randomize", 1, "none", 0.95]
    assert out["nodes"][1]["widgets_values"] == ["a cat"]
    assert to_api(out, DEFINITIONS)["3"]["inputs"]["model"] == ["1", 0]


def test_nodes_the_prompt_or_the_server_does_not_know_keep_their_values():
    graph = text_to_image(extra_nodes=[node(9, "Note", ["hello"]), node(10, "Unknown", [1, 2])])
    graph["nodes"].insert(0, graph["nodes"].pop())  # the unknown node first: later nodes are still written
    graph["nodes"].append(node(11, "KreaTextEncode", {"prompt": "saved by name"}))
    prompt = {"10": {"inputs": {"x": 3}}, "1": {"class_type": "KreaModelLoader"}, "2": {"inputs": {"prompt": "a cat"}},
              "11": {"inputs": {"prompt": "a cat"}}}
    out = with_values(graph, prompt, DEFINITIONS)
    by_id = {n["id"]: n["widgets_values"] for n in out["nodes"]}
    assert by_id[10] == [1, 2] and by_id[9] == ["hello"] and by_id[11] == {"prompt": "saved by name"}
    assert by_id[1] == graph["nodes"][1]["widgets_values"]  # no inputs in its prompt entry
    assert by_id[3] == graph["nodes"][3]["widgets_values"]  # not in the prompt at all
    assert by_id[2] == ["a cat"]
    assert with_values({"links": []}, prompt, DEFINITIONS) == {"links": []}


def test_a_primitive_node_without_a_value_and_a_link_from_a_note_resolve_to_nothing():
    graph = text_to_image(extra_nodes=[node(9, "PrimitiveNode", []), node(10, "Note", ["hi"])],
                          extra_links=[[30, 9, 0, 3, 2, "INT"], [31, 10, 0, 3, 3, "INT"]])
    sampler = graph["nodes"][2]
    sampler["inputs"] += [{"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 30},
                          {"name": "num_images", "type": "INT", "widget": {"name": "num_images"}, "link": 31}]
    inputs = to_api(graph, DEFINITIONS)["3"]["inputs"]
    assert (inputs["seed"], inputs["num_images"]) == (42, 1)  # the widgets keep their own values
