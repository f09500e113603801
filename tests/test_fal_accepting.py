"""What a run or a submit is checked for and what it hands to the backend, in-process over a backend that runs no
model (fal_protocol/service.py): unknown endpoints are 404, a full queue 503 queue_full, a backend's refusals fal's
error shape (422 on the size field, 500 workflow_refused) with the queue slot given back; the workflow carries the
request's seed (or one drawn below 2**32) and saves under the request's id; this server's own upload and result URLs
are taken as input images (under any prefix) and a gone one is a 422 on the field that named it.
"""
from __future__ import annotations

import asyncio
import base64

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import ModelFreeBackend, make_service, png_bytes, serving  # noqa: E402

from comfyui_krea.fal_api.backend import RequestTooLarge, WorkflowRefused  # noqa: E402
from comfyui_krea.fal_api.endpoints import ENDPOINTS  # noqa: E402
from comfyui_krea.fal_api.jobs import Job  # noqa: E402
from comfyui_krea.fal_api.routes import FalService  # noqa: E402
from comfyui_krea.fal_api.settings import ServiceSettings  # noqa: E402
from comfyui_krea.fal_api.workflow import RESULTS_SUBFOLDER  # noqa: E402

T2I, I2I, INPAINT = "/fal-ai/flux/krea", "/fal-ai/flux/krea/image-to-image", "/fal-ai/flux-krea-lora/inpainting"
STREAM = "/fal-ai/flux-krea-lora/stream"
SMALL = {"prompt": "x", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}


def run(scenario):
    return asyncio.run(scenario())


def inputs_of(prompt: dict) -> list[tuple[str, object]]:
    return [(name, value) for node in prompt.values() for name, value in node.get("inputs", {}).items()]


def test_an_unknown_endpoint_is_404_naming_the_ones_served(tmp_path):
    async def scenario():
        service = make_service(tmp_path)
        async with serving(service) as client:
            for path in ("/fal-ai/flux/dev", "/queue/fal-ai/flux/dev"):
                answer = await client.post(path, json=SMALL)
                assert answer.status == 404, path
                detail = (await answer.json())["detail"]
                assert "fal-ai/flux/dev" in detail and all(endpoint in detail for endpoint in ENDPOINTS)
            assert service.backend.submitted == []

    run(scenario)


def test_an_empty_json_body_is_a_422_for_a_missing_object_not_for_bad_json(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            answer = await client.post(T2I, data=b"", headers={"Content-Type": "application/json"})
            assert answer.status == 422
            (error,) = (await answer.json())["detail"]
            assert error["type"] == "model_attributes_type" and error["loc"] == ["body"]

    run(scenario)


def test_the_workflow_samples_with_the_requests_seed_and_saves_under_its_id(tmp_path):
    async def scenario():
        service = make_service(tmp_path)
        async with serving(service) as client:
            answer = await client.post("/queue" + T2I, json={**SMALL, "seed": 1234})
            request_id = (await answer.json())["request_id"]
            output = await (await client.get(f"/queue/fal-ai/flux/requests/{request_id}")).json()
            assert output["seed"] == 1234
            job, prompt = service.backend.submitted[-1]
            assert job.id == request_id and ("seed", 1234) in inputs_of(prompt)
            assert f"{RESULTS_SUBFOLDER}/{request_id}" in [value for _, value in inputs_of(prompt)]

            drawn = []
            for _ in range(40):
                drawn.append((await (await client.post(T2I, json=SMALL)).json())["seed"])
                assert ("seed", drawn[-1]) in inputs_of(service.backend.submitted[-1][1])
            assert all(0 <= seed < 2**32 for seed in drawn) and max(drawn) >= 2**16  # fal's seed range

    run(scenario)


def test_only_a_run_of_a_streaming_endpoint_asks_for_previews(tmp_path):
    async def scenario():
        service = make_service(tmp_path, hold=True)
        async with serving(service) as client:
            assert (await client.post("/queue" + STREAM, json=SMALL)).status == 200
            assert (await client.post("/queue" + T2I, json=SMALL)).status == 200
            assert [job.wants_previews for job, _ in service.backend.submitted] == [False, False]

    run(scenario)


def test_a_full_queue_is_503_queue_full_and_takes_nothing(tmp_path):
    async def scenario():
        service = make_service(tmp_path, hold=True, max_active=1)
        async with serving(service) as client:
            assert (await client.post("/queue" + T2I, json=SMALL)).status == 200
            answer = await client.post("/queue" + T2I, json=SMALL)
            assert answer.status == 503
            body = await answer.json()
            assert body["error_type"] == "queue_full" and "queue is full" in body["detail"]
            assert len(service.backend.submitted) == 1

    run(scenario)


@pytest.mark.parametrize("refusal, path, status, field, error_type", [
    (RequestTooLarge("needs 90 GB, 24 GB free"), T2I, 422, "image_size", None),
    (RequestTooLarge("needs 90 GB, 24 GB free"), I2I, 422, "image_url", None),
    (WorkflowRefused("no transformer in diffusion_models"), T2I, 500, None, "workflow_refused"),
])
def test_a_backends_refusal_is_fals_error_and_gives_the_queue_slot_back(tmp_path, refusal, path, status, field,
                                                                          error_type):
    async def scenario():
        service = make_service(tmp_path, max_active=1, refuse=refusal)
        async with serving(service) as client:
            image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
            body = {**SMALL, "image_url": image} if path == I2I else SMALL
            for _ in range(2):  # the second finds the slot given back, not a full queue
                answer = await client.post("/queue" + path, json=body)
                assert answer.status == status
                detail = await answer.json()
                if field is not None:
                    assert detail["detail"][0]["loc"] == ["body", field] and "90 GB" in detail["detail"][0]["msg"]
                else:
                    assert detail["error_type"] == error_type and "no transformer" in detail["detail"]
            assert service.jobs.active() == 0

    run(scenario)


async def uploaded(client, prefix: str) -> str:
    answer = await client.post(prefix + "/storage/upload/initiate",
                               json={"content_type": "image/png", "file_name": "a.png"})
    urls = await answer.json()
    put = await client.put("/" + urls["upload_url"].split("/", 3)[3], data=png_bytes())
    assert put.status == 200
    return urls["file_url"]


@pytest.mark.parametrize("prefix", ["", "/fal"])
def test_this_servers_upload_and_result_urls_are_input_images_and_gone_ones_are_422(tmp_path, prefix):
    async def scenario():
        service = make_service(tmp_path, prefix=prefix)
        async with serving(service) as client:
            file_url = await uploaded(client, prefix)
            made = await (await client.post(prefix + T2I, json=SMALL)).json()
            result_url = made["images"][0]["url"]
            no_name = file_url.rsplit("/", 1)[0]  # .../storage/files/<id>: the id alone names the upload
            for image in (file_url, no_name, result_url):
                for mask in (file_url, result_url):
                    answer = await client.post(prefix + INPAINT, json={**SMALL, "image_url": image,
                                                                       "mask_url": mask})
                    assert answer.status == 200, (image, mask, await answer.text())
            gone_upload = file_url.replace("/storage/files/", "/storage/files/x")
            gone_result = result_url.replace("/0.png", "/7.png")
            for gone, words in ((gone_upload, "no uploaded file"), (gone_result, "no result image")):
                answer = await client.post(prefix + INPAINT, json={**SMALL, "image_url": file_url, "mask_url": gone})
                assert answer.status == 422
                (error,) = (await answer.json())["detail"]
                assert error["loc"] == ["body", "mask_url"] and words in error["msg"], error

    run(scenario)


class FoldersBackend(ModelFreeBackend):
    """The backend's model folder lookups, as the runner and ComfyUI answer them: <models>/<kind>[/<name>]."""

    def __init__(self, root) -> None:
        super().__init__(root / "output")
        self.models = root / "models"

    def model_folder(self, kind: str):
        return self.models / kind

    def model_file(self, kind: str, name: str):
        return self.models / kind / name


def test_the_service_made_from_settings_keeps_each_setting_and_serves_earlier_records(tmp_path):
    settings = ServiceSettings(retention_hours=2.0, max_queue=3, allow_remote_images=True, allow_remote_loras=True,
                               api_key="k", max_megapixels=0.5, upload_quota_mb=2.0, allowed_hosts=("gpu.lan",))
    earlier = FalService.create(FoldersBackend(tmp_path), tmp_path / "uploads", settings)
    earlier.jobs.add_if_room(finished := Job(endpoint=T2I.lstrip("/"), arguments=None, seed=1))
    finished.complete(output={"images": []})

    service = FalService.create(FoldersBackend(tmp_path), tmp_path / "uploads", settings, prefix="/fal")
    assert service.jobs.get(finished.id) is not None  # the record of an earlier run, read back
    assert (service.uploads.retention_s, service.uploads.quota_bytes) == (7200.0, 2 * 1024 * 1024)
    assert (service.jobs.retention_s, service.jobs.max_active) == (7200.0, 3)
    assert (service.api_key, service.allow_remote_images, service.max_pixels) == ("k", True, settings.max_pixels)
    assert service.allowed_hosts == frozenset({"gpu.lan"}) and service.prefix == "/fal"
    loras = service.loras
    assert loras is not None and loras.allow_remote is True and loras.folder == tmp_path / "models" / "loras"
    assert loras.model_file("a.safetensors") == tmp_path / "models" / "loras" / "a.safetensors"


def test_loras_sent_to_a_server_that_takes_none_are_a_422_on_loras_before_queueing(tmp_path):
    async def scenario():
        service = make_service(tmp_path)  # no LoRA sources: `serve` without a loras folder
        async with serving(service) as client:
            answer = await client.post("/queue/fal-ai/flux-krea-lora",
                                       json={**SMALL, "loras": [{"path": "style.safetensors", "scale": 1.0}]})
            assert answer.status == 422
            (error,) = (await answer.json())["detail"]
            assert error["loc"] == ["body", "loras"] and "takes no LoRAs" in error["msg"]
            assert service.backend.submitted == [] and service.jobs.active() == 0
            assert (await client.post("/queue/fal-ai/flux-krea-lora", json={**SMALL, "loras": []})).status == 200

    run(scenario)


def test_a_bad_mask_url_is_a_422_on_mask_url(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
            for mask in ("ftp://images.example/mask.png", "data:image/png;base64,not-base64!"):
                answer = await client.post(INPAINT, json={**SMALL, "image_url": image, "mask_url": mask})
                assert answer.status == 422, mask
                (error,) = (await answer.json())["detail"]
                assert error["loc"] == ["body", "mask_url"], error

    run(scenario)


def test_an_image_url_of_another_host_is_fetched_whatever_its_path_looks_like(tmp_path):
    fetched = []

    async def fetch(url: str) -> bytes:
        fetched.append(url)
        return png_bytes()

    async def scenario():
        async with serving(make_service(tmp_path, allow_remote_images=True, fetch=fetch)) as client:
            for url in ("https://images.example/a/b/0.png", "https://images.example/storage/x/y/z.png"):
                answer = await client.post(I2I, json={**SMALL, "image_url": url})
                assert answer.status == 200, await answer.text()
            assert fetched == ["https://images.example/a/b/0.png", "https://images.example/storage/x/y/z.png"]

    run(scenario)
