"""fal's request schemas against what fal documents: every default, the edges of every range and every choice
accepted, one step past each edge refused (422, located at the field), and the safety checker on when a request
does not mention it, from the parsed request through the workflow it runs to the response.

The documented values are written out here, not read from the pack's parameter table, so that a changed table
entry fails against fal's own numbers.
"""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("pydantic", reason="the fal schemas need pydantic: pip install -e '.[serve]'")

from comfyui_krea.fal_api.endpoints import ENDPOINTS, IMAGE_TO_IMAGE, TEXT_TO_IMAGE  # noqa: E402
from comfyui_krea.fal_api.fields import write_inputs  # noqa: E402
from comfyui_krea.fal_api.schema import InputError  # noqa: E402
from comfyui_krea.fal_api.size_limit import check_requested_size  # noqa: E402
from comfyui_krea.fal_api.workflow import shipped_workflow, workflow_for  # noqa: E402

# fal's API page of fal-ai/flux/krea ("Input Schema": the defaults, ranges and options of every field).
TEXT_TO_IMAGE_DEFAULTS = {
    "image_size": "landscape_4_3", "num_inference_steps": 28, "seed": None, "guidance_scale": 4.5,
    "sync_mode": False, "num_images": 1, "enable_safety_checker": True, "output_format": "jpeg",
    "acceleration": "none",
}
# fal's model page of fal-ai/flux/krea/image-to-image: its full request example holds the defaults, which differ
# from text-to-image in strength (new) and num_inference_steps (40); there is no image_size (the input's size).
IMAGE_TO_IMAGE_DEFAULTS = {
    "strength": 0.95, "num_inference_steps": 40, "seed": None, "guidance_scale": 4.5, "sync_mode": False,
    "num_images": 1, "enable_safety_checker": True, "output_format": "jpeg", "acceleration": "none",
}
PRESETS = ("square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9")
# (field, lowest, highest) from fal's API page. strength's range is not on fal's pages: 0.01 to 1 is the pack's
# (0 would run no step at all); seed is "an integer" at fal, 0 to 2^64 - 1 here as in ComfyUI.
RANGES = [("num_inference_steps", 1, 50), ("guidance_scale", 1.0, 20.0), ("num_images", 1, 4),
          ("seed", 0, 2**64 - 1)]
IMAGE_TO_IMAGE_RANGES = [("strength", 0.01, 1.0)]
# fal's ImageSize object (fal's OpenAPI schema of the endpoint): width and height > 0 and <= 14142, 512 default.
SIDE_MAX = 14142
PROMPT_MAX = 20_000  # the pack's limit (fal publishes none): 20000 characters pass, one more is refused

PNG_URL = "data:image/png;base64,iVBORw0KGgo="  # the schema checks only that image_url is a non-empty string


def parse(endpoint: str, **fields: object):
    body = {"prompt": "a fox", **({"image_url": PNG_URL} if endpoint == IMAGE_TO_IMAGE else {}), **fields}
    return ENDPOINTS[endpoint].parse(body)


def refused(endpoint: str, **fields: object) -> list[dict]:
    with pytest.raises(InputError) as error:
        parse(endpoint, **fields)
    return error.value.detail


@pytest.mark.parametrize("endpoint, documented", [(TEXT_TO_IMAGE, TEXT_TO_IMAGE_DEFAULTS),
                                                  (IMAGE_TO_IMAGE, IMAGE_TO_IMAGE_DEFAULTS)])
def test_every_default_is_what_fal_documents(endpoint, documented):
    parsed = parse(endpoint).model_dump()
    assert {name: parsed[name] for name in documented} == documented
    for name, value in documented.items():  # 28 is an int and 4.5 a float, as in fal's schema
        assert type(parsed[name]) is type(value), name
    assert ("strength" in parsed) == (endpoint == IMAGE_TO_IMAGE)
    assert ("image_size" in parsed) == (endpoint == TEXT_TO_IMAGE)


def test_a_custom_size_defaults_to_fals_512():
    assert parse(TEXT_TO_IMAGE, image_size={}).image_size.model_dump() == {"width": 512, "height": 512}
    assert parse(TEXT_TO_IMAGE, image_size={"width": 768}).image_size.model_dump() == {"width": 768, "height": 512}


@pytest.mark.parametrize("endpoint", [TEXT_TO_IMAGE, IMAGE_TO_IMAGE])
@pytest.mark.parametrize("field, value", [(name, edge) for name, low, high in RANGES for edge in (low, high)])
def test_both_edges_of_every_range_are_accepted(endpoint, field, value):
    got = getattr(parse(endpoint, **{field: value}), field)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("field, value", [(name, edge) for name, low, high in IMAGE_TO_IMAGE_RANGES
                                          for edge in (low, high)])
def test_both_edges_of_strength_are_accepted(field, value):
    assert getattr(parse(IMAGE_TO_IMAGE, **{field: value}), field) == value


@pytest.mark.parametrize("endpoint, field, value", [
    *[(endpoint, name, beyond) for endpoint in (TEXT_TO_IMAGE, IMAGE_TO_IMAGE) for name, low, high in RANGES
      for beyond in ((low - 1 if isinstance(low, int) else low - 1e-9), (high + 1 if isinstance(high, int)
                                                                          else high + 1e-9))],
    (IMAGE_TO_IMAGE, "strength", 0.01 - 1e-9), (IMAGE_TO_IMAGE, "strength", 1.0 + 1e-9),
])
def test_one_step_past_each_edge_is_refused_at_that_field(endpoint, field, value):
    (problem,) = refused(endpoint, **{field: value})
    assert problem["loc"] == ["body", field] and problem["type"] in ("greater_than_equal", "less_than_equal")


@pytest.mark.parametrize("endpoint", [TEXT_TO_IMAGE, IMAGE_TO_IMAGE])
@pytest.mark.parametrize("field, choices", [
    ("output_format", ("jpeg", "png", "webp")),  # fal's jpeg and png; webp is the pack's addition
    ("acceleration", ("none", "regular", "high")),
])
def test_every_choice_is_accepted_and_another_is_refused(endpoint, field, choices):
    assert [getattr(parse(endpoint, **{field: choice}), field) for choice in choices] == list(choices)
    (problem,) = refused(endpoint, **{field: "fastest"})
    assert problem["loc"] == ["body", field]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_size_preset_is_accepted(preset):
    assert parse(TEXT_TO_IMAGE, image_size=preset).image_size == preset


def test_an_unknown_preset_is_refused():
    problems = refused(TEXT_TO_IMAGE, image_size="square_4k")
    assert problems and all(p["loc"][:2] == ["body", "image_size"] for p in problems)


@pytest.mark.parametrize("side", [1, 16, SIDE_MAX])
def test_custom_sides_from_1_to_14142_are_accepted(side):
    size = parse(TEXT_TO_IMAGE, image_size={"width": side, "height": side}).image_size
    assert (size.width, size.height) == (side, side)


@pytest.mark.parametrize("side", [0, -16, SIDE_MAX + 1])
def test_custom_sides_outside_are_refused(side):
    problems = refused(TEXT_TO_IMAGE, image_size={"width": side, "height": 64})
    assert any(p["loc"][:2] == ["body", "image_size"] and p["loc"][-1] == "width" for p in problems)


def test_the_prompt_limit_is_accepted_and_one_character_more_refused():
    assert len(parse(TEXT_TO_IMAGE, prompt="x" * PROMPT_MAX).prompt) == PROMPT_MAX
    (problem,) = refused(TEXT_TO_IMAGE, prompt="x" * (PROMPT_MAX + 1))
    assert problem["loc"] == ["body", "prompt"] and problem["type"] == "string_too_long"


def test_both_booleans_are_accepted():
    for field in ("sync_mode", "enable_safety_checker"):
        assert [getattr(parse(TEXT_TO_IMAGE, **{field: v}), field) for v in (True, False)] == [True, False]


def test_a_refused_value_is_echoed_back_cut_short():
    # FastAPI's 422 echoes each offending value as `input`; a long one is cut (a 60 MB data URI is not sent back).
    assert refused(TEXT_TO_IMAGE, num_images="y" * 200)[0]["input"] == "y" * 200
    assert refused(TEXT_TO_IMAGE, num_images="y" * 201)[0]["input"] == "y" * 200 + "..."
    assert refused(TEXT_TO_IMAGE, num_images=["z" * 996])[0]["input"] == ["z" * 996]  # shown in 1000 characters
    assert refused(TEXT_TO_IMAGE, num_images=["z" * 997])[0]["input"] is None
    assert refused(TEXT_TO_IMAGE, guidance_scale=20.5)[0]["input"] == 20.5
    assert refused(TEXT_TO_IMAGE, guidance_scale=float("nan"))[0]["input"] == "nan"  # NaN is not JSON


def test_the_error_text_names_every_problem_where_it_is():
    with pytest.raises(InputError) as error:
        parse(TEXT_TO_IMAGE, num_images=0, guidance_scale=0)
    assert str(error.value) == ("body.guidance_scale: Input should be greater than or equal to 1; "
                                "body.num_images: Input should be greater than or equal to 1")


def test_a_size_over_the_pixel_cap_is_refused_in_fastapis_shape():
    cap = 1024 * 1024
    check_requested_size(parse(TEXT_TO_IMAGE, image_size={"width": 1039, "height": 1024}), cap)  # made 1024 wide
    with pytest.raises(InputError) as error:
        check_requested_size(parse(TEXT_TO_IMAGE, image_size={"width": 1040, "height": 1024}), cap)
    message = ("image_size 1040x1024 (1.02 megapixels) is over this server's limit of 1 megapixels per image (a "
               "megapixel here is 1024x1024 pixels, as fal counts; fal's own limit is 4; the operator sets it with "
               "--max-megapixels, or KREA_FAL_MAX_MEGAPIXELS inside ComfyUI): ask for a smaller size")
    assert error.value.detail == [{"type": "value_error", "loc": ["body", "image_size"], "msg": message,
                                   "input": {"width": 1040, "height": 1024}}]
    assert str(error.value) == f"body.image_size: {message}"


def test_a_field_is_written_into_every_node_of_its_type_even_one_without_inputs():
    prompt = {"1": {"class_type": "KreaSampler"}, "2": {"class_type": "KreaSampler", "inputs": {"seed": 1}},
              "3": {"class_type": "KreaSaveImage", "inputs": {}}}
    write_inputs(prompt, {"seed": 9, "num_images": None})  # None leaves the workflow's own value
    assert [node.get("inputs") for node in prompt.values()] == [{"seed": 9}, {"seed": 9}, {}]


def test_each_request_starts_from_the_shipped_workflow():
    endpoint = ENDPOINTS[TEXT_TO_IMAGE]
    shipped = json.loads(endpoint.workflow.read_text())
    custom = workflow_for(endpoint, parse(TEXT_TO_IMAGE, image_size={"width": 96, "height": 80}), 1, "first")
    assert nodes_of(custom, "KreaSampler")[0]["width"] == 96
    preset = workflow_for(endpoint, parse(TEXT_TO_IMAGE), 2, "second")
    assert nodes_of(preset, "KreaSampler")[0]["width"] == nodes_of(shipped, "KreaSampler")[0]["width"]
    assert shipped_workflow(endpoint.workflow) == shipped  # the copy read once is never written to


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [node["inputs"] for node in prompt.values() if node["class_type"] == class_type]


@pytest.mark.parametrize("endpoint", [TEXT_TO_IMAGE, IMAGE_TO_IMAGE])
def test_a_bare_request_runs_a_workflow_with_fals_defaults_and_the_safety_checker_on(endpoint):
    images = {"image_url": "fal-input-0"} if endpoint == IMAGE_TO_IMAGE else None
    prompt = workflow_for(ENDPOINTS[endpoint], parse(endpoint), seed=7, request_id="r", images=images)
    (sampler,) = nodes_of(prompt, "KreaSampler")
    documented = IMAGE_TO_IMAGE_DEFAULTS if endpoint == IMAGE_TO_IMAGE else TEXT_TO_IMAGE_DEFAULTS
    for field in ("num_inference_steps", "guidance_scale", "num_images", "acceleration", "image_size", "strength"):
        if field in documented:
            assert sampler[field] == documented[field], field
    assert sampler["seed"] == 7
    (safety,) = nodes_of(prompt, "KreaSafetyCheck")
    assert safety["enable_safety_checker"] is True
    (save,) = nodes_of(prompt, "KreaSaveImage")
    assert save["output_format"] == "jpeg"
    off = workflow_for(ENDPOINTS[endpoint], parse(endpoint, enable_safety_checker=False), seed=7, request_id="r",
                       images=images)
    assert nodes_of(off, "KreaSafetyCheck")[0]["enable_safety_checker"] is False


def test_the_safety_checker_runs_for_a_request_that_does_not_mention_it(tmp_path, host_state):
    """End to end through `serve`'s app: with a classifier that flags every image, a request without
    enable_safety_checker comes back flagged and black; the same request with it false comes back unflagged."""
    pytest.importorskip("aiohttp", reason="the fal server needs aiohttp: pip install -e '.[serve]'")
    from aiohttp.test_utils import TestClient, TestServer
    from PIL import Image

    from comfyui_krea.model_loader.safety_checker import DEMO_SAFETY_CONFIG, write_random_safety_checkpoint
    from comfyui_krea.standalone.demo import write_demo_models
    from comfyui_krea.standalone.fal_server import ServeOptions, make_app

    models, tokenizers = write_demo_models(tmp_path / "demo")
    write_random_safety_checkpoint(models / "safety_checker" / "nsfw_image_detection.safetensors",
                                   DEMO_SAFETY_CONFIG, seed=4, bias_towards="nsfw")
    output = tmp_path / "out"
    small = {"prompt": "a fox", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1, "seed": 3}

    async def requests() -> list[dict]:
        app, _ = make_app(ServeOptions(output=output, models=models, tokenizers=tokenizers))
        answers = []
        async with TestClient(TestServer(app)) as client:
            for body in (small, {**small, "enable_safety_checker": False}):
                answer = await client.post("/" + TEXT_TO_IMAGE, json=body)
                assert answer.status == 200, await answer.text()
                answers.append(await answer.json())
        return answers

    checked, unchecked = asyncio.run(requests())
    assert checked["has_nsfw_concepts"] == [True] and unchecked["has_nsfw_concepts"] == [False]
    saved = sorted((output / "fal").glob("*.jp*g"), key=lambda p: p.stat().st_mtime_ns)
    assert len(saved) == 2
    with Image.open(saved[0]) as first, Image.open(saved[1]) as second:
        assert first.convert("L").getextrema() == (0, 0)  # the flagged image was replaced by black
        assert second.convert("L").getextrema()[1] > 0
