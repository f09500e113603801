"""Retention: uploads, request records and result URLs live until the stated limit, then answer 404 (and uploaded
files are deleted); upload ids and names cannot reach outside the uploads folder."""
from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from PIL import Image  # noqa: E402

from comfyui_krea.fal_api.jobs import JobStore  # noqa: E402
from comfyui_krea.fal_api.routes import FalService, add_fal_routes  # noqa: E402
from comfyui_krea.fal_api.storage import Uploads, clean_name, is_token  # noqa: E402
from comfyui_krea.fal_api.workflow import finish  # noqa: E402

HOUR = 3600.0


class SavingBackend:
    """Ends each job as the runner would after its workflow saved one image (no model: retention is the point)."""

    def __init__(self, output_dir):
        self.output_dir = output_dir

    def image_reference(self, path):
        return str(path)

    async def submit(self, job, prompt):
        folder = self.output_dir / "fal"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 16)).save(folder / f"{job.id}_00001_.png")
        saver = next(k for k, n in prompt.items() if n["class_type"] == "KreaSaveImage")
        uis = {saver: {"images": [{"filename": f"{job.id}_00001_.png", "subfolder": "fal", "type": "output"}]}}
        finish(job, prompt, uis, self.output_dir, 0.01)

    def position(self, job):
        return None

    def cancel(self, job):
        pass


def test_uploads_expire_and_their_files_are_deleted(tmp_path):
    uploads = Uploads(tmp_path / "up", retention_s=HOUR)
    uploads.prepare()
    file_id, stored = uploads.store(b"png bytes", "image/png", "../../etc/passwd")
    assert is_token(file_id) and stored.path.parent == tmp_path / "up" and stored.name == "passwd"
    assert uploads.get(file_id) is stored and uploads.get("../" + file_id) is None
    uploads.expire(now=time.time() + HOUR - 60)
    assert uploads.get(file_id) is stored
    uploads.expire(now=time.time() + HOUR + 60)
    assert uploads.get(file_id) is None and not stored.path.exists()


def test_clean_names_stay_names():
    assert clean_name("..\\..\\win.ini") == "win.ini"
    assert clean_name("/etc/shadow") == "shadow"
    assert clean_name("..") == "upload.bin" and clean_name(None) == "upload.bin"
    assert clean_name("a b;c.png") == "a_b_c.png"
    assert clean_name("_My-Photo.PNG.") == "My-Photo.PNG" and clean_name("X" * 150) == "X" * 100


def test_result_urls_work_until_the_retention_limit(tmp_path):
    async def scenario() -> None:
        uploads = Uploads(tmp_path / "up", retention_s=HOUR)
        uploads.prepare()
        jobs = JobStore(retention_s=HOUR, max_active=4)
        service = FalService(backend=SavingBackend(tmp_path / "out"), uploads=uploads, jobs=jobs)
        from aiohttp import web

        app = web.Application()
        add_fal_routes(app.router, service)
        async with TestClient(TestServer(app)) as client:
            answer = await client.post("/queue/fal-ai/flux/krea", json={"prompt": "x"})
            request_id = (await answer.json())["request_id"]
            result = await (await client.get(f"/queue/fal-ai/flux/requests/{request_id}")).json()
            path = "/" + result["images"][0]["url"].split("/", 3)[3]
            assert (await client.get(path)).status == 200
            jobs.expire(now=time.time() + HOUR - 60)
            assert (await client.get(path)).status == 200
            jobs.expire(now=time.time() + HOUR + 60)
            assert (await client.get(path)).status == 404
            assert (await client.get(f"/queue/fal-ai/flux/requests/{request_id}/status")).status == 404
            assert (tmp_path / "out" / "fal" / f"{request_id}_00001_.png").is_file()  # the image itself stays

    asyncio.run(scenario())
