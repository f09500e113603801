"""The fal protocol added to ComfyUI's server at start-up (nodes/host/fal_queue.py, register_fal_routes), in-process
over stand-ins of the ComfyUI 0.3.64 parts it uses (tests/comfyui_server_stand_ins.py): the /fal route on
PromptServer's route table reaching ComfyUI's queue, the step listener, the start-up line, the settings refused and
the TLS key warning. The real ComfyUI serving fal's clients is tests/test_fal_clients.py.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import sys

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from comfyui_server_stand_ins import Comfy, forget_fal_queue, import_fal_queue
from PIL import Image

from comfyui_krea.fal_api import settings as fal_settings
from comfyui_krea.fal_api.jobs import IN_QUEUE

FAL_ENV = [name for name in vars(fal_settings) if name.endswith("_ENV")]
LOGGER = "comfyui_krea.nodes.host.fal_queue"


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    for name in FAL_ENV:
        monkeypatch.delenv(getattr(fal_settings, name), raising=False)
    made = Comfy(tmp_path)
    made.fal = import_fal_queue(monkeypatch, made)
    yield made
    forget_fal_queue()


def test_without_a_running_comfyui_server_nothing_is_registered(comfy):
    listeners = []
    assert comfy.fal.register_fal_routes(listeners.append) is None  # no PromptServer made: a script, a test
    assert listeners == []


def test_the_protocol_is_served_under_fal_of_comfyuis_server_and_requests_reach_its_queue(comfy, caplog):
    server = comfy.start_server()
    listeners = []
    with caplog.at_level(logging.INFO, logger=LOGGER):
        service = comfy.fal.register_fal_routes(listeners.append)
    assert service is not None and service.prefix == "/fal"
    (route,) = list(server.routes)
    assert (route.method, route.path) == ("*", "/fal/{tail:.*}")
    assert (comfy.input_dir / "fal-uploads").is_dir()  # uploaded images wait where LoadImage reads
    assert [record.getMessage() for record in caplog.records if record.name == LOGGER] == [
        comfy.fal.startup_line(fal_settings.ServiceSettings.from_environment())]

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(buffer, format="PNG")
    png = buffer.getvalue()

    async def scenario():
        app = web.Application()
        app.add_routes(server.routes)  # as ComfyUI's add_routes does with PromptServer.routes
        async with TestClient(TestServer(app)) as client:
            answer = await client.post("/fal/queue/fal-ai/flux/krea", json={"prompt": "a red fox", "seed": 3,
                                                                       "num_inference_steps": 2})
            assert answer.status == 200, await answer.text()
            request_id = (await answer.json())["request_id"]
            (queued,) = server.prompt_queue.queue
            assert queued[1] == request_id and queued[0] == 0 and server.number == 1
            status = await (await client.get(f"/fal/queue/fal-ai/flux/requests/{request_id}/status")).json()
            assert (status["status"], status["queue_position"]) == (IN_QUEUE, 0)
            comfy.run_next()
            (listener,) = listeners  # ComfyUI's sampler steps reach the request's logs
            listener(request_id, 1, 2, torch.zeros(1, 16, 2, 2))
            status = await (await client.get(f"/fal/queue/fal-ai/flux/requests/{request_id}/status",
                                             params={"logs": "1"})).json()
            assert [entry["message"] for entry in status["logs"]][-1] == "step 1/2"
            assert (await client.put(f"/fal/queue/fal-ai/flux/requests/{request_id}/cancel")).status == 202
            assert comfy.interrupts == [True]
            answer = await client.post("/fal/queue/fal-ai/flux/krea/image-to-image", json={
                "prompt": "a red fox", "image_url": "data:image/png;base64," + base64.b64encode(png).decode()})
            assert answer.status == 200, await answer.text()
            (queued,) = server.prompt_queue.queue
            (loaded,) = [node["inputs"]["image"] for node in queued[2].values() if node["class_type"] == "LoadImage"]
            assert loaded.startswith("fal-uploads/") and (comfy.input_dir / loaded).read_bytes() == png
    asyncio.run(scenario())


def test_a_wrong_setting_leaves_the_protocol_off_and_says_which(comfy, monkeypatch, caplog):
    comfy.start_server()
    monkeypatch.setenv(fal_settings.MAX_QUEUE_ENV, "0")
    listeners = []
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert comfy.fal.register_fal_routes(listeners.append) is None
    assert listeners == [] and list(comfy.server_class.instance.routes) == []
    assert fal_settings.MAX_QUEUE_ENV in caplog.text


def test_the_startup_line_says_whether_a_key_is_required(comfy):
    open_line = comfy.fal.startup_line(fal_settings.ServiceSettings())
    keyed_line = comfy.fal.startup_line(fal_settings.ServiceSettings(api_key="secret"))
    assert f"it accepts any key until {fal_settings.API_KEY_ENV} is set" in open_line
    assert f"it requires the key set in {fal_settings.API_KEY_ENV}" in keyed_line and "secret" not in keyed_line
    assert "/fal" in open_line


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
@pytest.mark.parametrize("mode, warned", [(0o644, "can be read by every user"), (0o640, "can be read by its group"),
                                          (0o600, None), (None, None), ("no option", None)])
def test_a_tls_key_others_can_read_is_warned_about(comfy, tmp_path, caplog, mode, warned):
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    if mode == "no option":  # a ComfyUI whose arguments have no TLS options
        del sys.modules["comfy.cli_args"].args.tls_keyfile
    elif mode is not None:
        key.chmod(mode)
        sys.modules["comfy.cli_args"].args.tls_keyfile = str(key)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        comfy.fal.warn_about_tls_key()
    warnings = [record.getMessage() for record in caplog.records if record.name == LOGGER]
    if warned is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.startswith(f"fal: the TLS private key {key} {warned}")
