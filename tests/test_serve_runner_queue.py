"""The queue of `serve`'s in-process runner (standalone/runner_backend.py) as fal's clients see it, on the demo models
over aiohttp's TestServer: the positions of waiting requests, cancelling a waiting and a running request, what a
request is refused for before it waits (a model name leaving the folder, a missing LoRA, too much memory), `--model`,
shutdown, and where uploads are kept."""
from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from fal_protocol.service import png_bytes  # noqa: E402

from comfyui_krea.fal_api.settings import ServiceSettings  # noqa: E402
from comfyui_krea.standalone import runner_backend  # noqa: E402
from comfyui_krea.standalone.demo import DEMO_FLUX, write_demo_models  # noqa: E402
from comfyui_krea.standalone.fal_server import BACKEND, ServeOptions, make_app  # noqa: E402

T2I = "fal-ai/flux/krea"
LORA = "fal-ai/flux-krea-lora"
SMALL = {"image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}
LONG = {"image_size": {"width": 1024, "height": 1024}, "num_inference_steps": 50}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    models, tokenizers = write_demo_models(tmp_path_factory.mktemp("queue-demo"))
    from lora_files import write_lora

    (models / "loras").mkdir()
    # made for a model with 2 double blocks: the demo's has one
    write_lora(models / "loras" / "other-model.safetensors", DEMO_FLUX, "comfyui", seed=1)
    return models, tokenizers


def run(demo, output: Path, scenario, **options):
    """scenario(client, app) on a served make_app over the demo models; what it returns."""
    async def main():
        app, _ = make_app(ServeOptions(output=output, models=demo[0], tokenizers=demo[1], **options))
        async with TestClient(TestServer(app)) as client:
            return await scenario(client, app)

    return asyncio.run(main())


async def queued(client, body: dict, endpoint: str = T2I) -> str:
    answer = await client.post(f"/queue/{endpoint}", json=body)
    assert answer.status == 200, await answer.text()
    return (await answer.json())["request_id"]


async def status(client, request_id: str) -> dict:
    return await (await client.get(f"/queue/fal-ai/flux/requests/{request_id}/status")).json()


async def until(client, request_id: str, state: str) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen = await status(client, request_id)
        if seen["status"] == state:
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"{request_id} never reached {state}: {seen}")


async def cancel(client, request_id: str) -> int:
    return (await client.put(f"/queue/fal-ai/flux/requests/{request_id}/cancel")).status


def test_waiting_requests_have_their_place_in_line_and_cancelling_ends_them_as_cancelled(demo, tmp_path,
                                                                                         host_state):
    async def scenario(client, app):
        first, second, third = [await queued(client, {"prompt": "x", **LONG}) for _ in range(3)]
        await until(client, first, "IN_PROGRESS")
        waiting = [await status(client, second), await status(client, third)]
        assert [(s["status"], s["queue_position"]) for s in waiting] == [("IN_QUEUE", 0), ("IN_QUEUE", 1)]
        assert await cancel(client, second) == 202
        ended = await status(client, second)  # at once: it never ran
        assert ended["status"] == "COMPLETED" and ended["error_type"] == "request_cancelled", ended
        assert "while it waited" in ended["error"]
        moved_up = await status(client, third)
        assert (moved_up["status"], moved_up["queue_position"]) == ("IN_QUEUE", 0)
        assert await cancel(client, first) == 202
        stopped = await until(client, first, "COMPLETED")
        assert stopped["error_type"] == "request_cancelled" and "while it ran" in stopped["error"], stopped
        await until(client, third, "IN_PROGRESS")
        await cancel(client, third)
        assert (await until(client, third, "COMPLETED"))["error_type"] == "request_cancelled"

    run(demo, tmp_path / "out", scenario)


def lora_body(path: str) -> dict:
    return {"prompt": "x", "sync_mode": True, "loras": [{"path": path, "scale": 1.0}], **SMALL}


@pytest.mark.parametrize("path, status, says", [
    ("../diffusion_models/flux1-krea-dev.safetensors", 422, "leaves the model folder"),
    ("absent.safetensors", 422, "no LoRA named 'absent.safetensors'"),
    ("other-model.safetensors", 422, "it was made for another model"),  # found, read and checked against the base
], ids=["leaves the folder", "not there", "in the folder"])
def test_lora_names_are_files_of_the_servers_loras_folder(demo, tmp_path, host_state, path, status, says):
    async def scenario(client, app):
        answer = await client.post(f"/{LORA}", json=lora_body(path))
        return answer.status, await answer.json()

    got, answer = run(demo, tmp_path / "out", scenario)
    assert got == status, answer
    (problem,) = answer["detail"]
    assert problem["loc"] == ["body", "loras", 0, "path"] and says in problem["msg"], problem


def test_serve_model_makes_every_request_read_that_transformer_file(demo, tmp_path, host_state):
    async def scenario(client, app):
        answer = await client.post(f"/{T2I}", json={"prompt": "x", **SMALL})
        return answer.status, await answer.json()

    got, answer = run(demo, tmp_path / "out", scenario, model="other.safetensors")
    assert answer["error_type"] == "workflow_refused" and "'other.safetensors'" in answer["detail"], (got, answer)


def test_a_request_too_large_for_the_memory_is_refused_with_its_image_size_and_without_the_check_queued(
        demo, tmp_path, host_state, monkeypatch):
    # an input image of 2000x1500 asks for an image-to-image run of 2000x1504 (sides rounded to multiples of 16)
    image = "data:image/png;base64," + base64.b64encode(png_bytes(2000, 1500)).decode()
    body = {"prompt": "x", "image_url": image, "strength": 0.5, "num_inference_steps": 1}

    async def scenario(client, app):
        answer = await client.post("/queue/fal-ai/flux/krea/image-to-image", json=body)
        result = answer.status, await answer.json()
        if answer.status == 200:
            await cancel(client, result[1]["request_id"])
        return result

    monkeypatch.setattr(runner_backend, "available_memory", lambda device: (16 << 20, "16 MiB of RAM"))
    settings = ServiceSettings(max_megapixels=100)
    got, answer = run(demo, tmp_path / "out", scenario, service=settings)
    unchecked, _ = run(demo, tmp_path / "out2", scenario, service=settings, memory_check=False)
    assert got == 422, answer
    message = answer["detail"][0]["msg"]
    assert "1 image of 2000x1504" in message and "free when the server started" in message, message
    assert unchecked == 200


def test_after_shutdown_waiting_requests_end_cancelled_and_new_ones_are_refused(demo, tmp_path, host_state):
    async def scenario(client, app):
        first, second = [await queued(client, {"prompt": "x", **LONG}) for _ in range(2)]
        await until(client, first, "IN_PROGRESS")
        app[BACKEND].shutdown()
        seen = {"second": await status(client, second), "first": await until(client, first, "COMPLETED")}
        answer = await client.post(f"/{T2I}", json={"prompt": "x", **SMALL})
        seen["new"] = answer.status, await answer.json()
        seen["worker stopped"] = app[BACKEND].close(30)  # as `serve` does after shutdown
        return seen

    seen = run(demo, tmp_path / "out", scenario)
    assert seen["second"]["status"] == "COMPLETED" and "shut down" in seen["second"]["error"]
    assert seen["second"]["error_type"] == "request_cancelled"
    assert "while it ran" in seen["first"]["error"]
    assert seen["new"][1]["error_type"] == "workflow_refused" and "shutting down" in seen["new"][1]["detail"]
    assert seen["worker stopped"]


def test_uploads_are_kept_in_the_outputs_fal_uploads_folder_and_no_worker_outlives_the_server(demo, tmp_path,
                                                                                              host_state):
    async def scenario(client, app):
        answer = await client.post("/files/upload", data=png_bytes(), headers={"Content-Type": "image/png"})
        return answer.status

    assert run(demo, tmp_path / "out", scenario) == 200
    kept = [path for path in (tmp_path / "out" / "fal-uploads").rglob("*") if path.is_file()]
    assert [path.read_bytes() for path in kept if path.read_bytes() == png_bytes()] == [png_bytes()], kept
    assert not [thread for thread in threading.enumerate() if thread.name == "krea-fal-runner"]
