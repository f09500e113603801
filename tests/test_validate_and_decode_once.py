"""Validate once, decode once: a prompt checked by the runner is run without being validated again, and the input
image of a fal image-to-image request is decoded once, when the request is checked, then handed on as it is."""
from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image, ImageFile

from comfyui_krea.standalone.runner import CheckedPrompt, WorkflowError, check, run


class Counted:
    """An output node whose VALIDATE_INPUTS counts its calls."""
    RETURN_TYPES = ()
    FUNCTION = "go"
    OUTPUT_NODE = True
    checks = 0

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"value": ("INT", {"min": 0, "max": 9})}}

    @classmethod
    def VALIDATE_INPUTS(cls, value: int | None = None) -> bool | str:
        cls.checks += 1
        return True if value != 7 else "value: 7 is not allowed\nvalue: and said on a second line"

    def go(self, value: int) -> dict:
        return {"ui": {"value": [value]}}


def test_a_checked_prompt_runs_without_being_validated_again():
    Counted.checks = 0
    classes = {"Counted": Counted}
    checked = check({"1": {"class_type": "Counted", "inputs": {"value": 3}}}, classes)
    assert isinstance(checked, CheckedPrompt) and Counted.checks == 1
    assert run(checked) == {"1": {"value": [3]}} and Counted.checks == 1
    assert run({"1": {"class_type": "Counted", "inputs": {"value": 4}}}, classes) == {"1": {"value": [4]}}
    assert Counted.checks == 2  # a plain prompt is validated before it runs


def test_each_line_of_a_nodes_check_is_one_problem():
    with pytest.raises(WorkflowError) as refused:
        check({"1": {"class_type": "Counted", "inputs": {"value": 7}}}, {"Counted": Counted})
    assert str(refused.value).splitlines()[1:] == ["  node 1 (Counted): value: 7 is not allowed",
                                                   "  node 1 (Counted): value: and said on a second line"]


def png_data_uri(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_the_input_image_of_a_fal_request_is_decoded_once(tmp_path, monkeypatch, host_state):
    pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")
    from aiohttp.test_utils import TestClient, TestServer

    from comfyui_krea.standalone.demo import write_demo_models
    from comfyui_krea.standalone.fal_server import ServeOptions, make_app

    models, tokenizers = write_demo_models(tmp_path / "demo")
    decodes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def counting_load(image):
        if image.tile:  # pixels still to decode (a decoded image's load() does nothing)
            decodes.append(image.size)
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    body = {"prompt": "a fox", "image_url": png_data_uri(48, 32), "num_inference_steps": 2, "strength": 0.5,
            "enable_safety_checker": False}

    async def request() -> dict:
        app, _ = make_app(ServeOptions(output=tmp_path / "out", models=models, tokenizers=tokenizers))
        async with TestClient(TestServer(app)) as client:
            answer = await client.post("/fal-ai/flux/krea/image-to-image", json=body)
            assert answer.status == 200, await answer.text()
            return await answer.json()

    output = asyncio.run(request())
    assert [(image["width"], image["height"]) for image in output["images"]] == [(48, 32)]
    assert decodes == [(48, 32)]  # checked and decoded on arrival; the workflow's LoadImage decoded nothing
