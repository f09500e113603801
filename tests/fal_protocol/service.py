"""The protocol library in-process, for tests of its limits: a FalService over a backend that runs no model (it
saves one small image per request, or holds requests until told), served by aiohttp on 127.0.0.1, and a raw HTTP
client that can send what well-behaved clients never do (slow bodies, odd headers, bytes that are not UTF-8).
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from comfyui_krea.fal_api.jobs import CANCELLED, Job, JobStore
from comfyui_krea.fal_api.records import RecordFolder
from comfyui_krea.fal_api.routes import FalService, add_fal_routes
from comfyui_krea.fal_api.storage import Uploads
from comfyui_krea.fal_api.workflow import RESULTS_SUBFOLDER, finish

HOUR = 3600.0


def png_bytes(width: int = 32, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


class ModelFreeBackend:
    """Ends each request as the runner would after its workflow saved one 32x16 png; with `hold`, requests wait
    until cancelled; with `refuse`, submit raises it, as a backend that cannot take the workflow does. `submitted`
    keeps each (job, workflow) handed over."""

    def __init__(self, output_dir: Path, hold: bool = False, refuse: Exception | None = None) -> None:
        self.output_dir = output_dir
        self.hold = hold
        self.refuse = refuse
        self.waiting: list[Job] = []
        self.submitted: list[tuple[Job, dict]] = []

    def image_reference(self, job: Job, image) -> str:
        return "input"

    async def submit(self, job: Job, prompt: dict) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append((job, prompt))
        if self.hold:
            self.waiting.append(job)
            return
        folder = self.output_dir / RESULTS_SUBFOLDER
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 16)).save(folder / f"{job.id}_00001_.png")
        saver = next(k for k, n in prompt.items() if n["class_type"] == "KreaSaveImage")
        uis = {saver: {"images": [{"filename": f"{job.id}_00001_.png", "subfolder": RESULTS_SUBFOLDER}]}}
        job.start()
        finish(job, prompt, uis, self.output_dir, 0.01)

    def position(self, job: Job) -> int | None:
        return self.waiting.index(job) if job in self.waiting else None

    def cancel(self, job: Job) -> None:
        if job in self.waiting:
            self.waiting.remove(job)
        job.complete(error="the request was cancelled while it waited", error_type=CANCELLED)


def make_service(root: Path, retention_s: float = HOUR, max_active: int = 8, records: bool = True,
                 hold: bool = False, quota_bytes: int = 1 << 30, max_records: int = 4096,
                 refuse: Exception | None = None, **options) -> FalService:
    uploads = Uploads(root / "uploads", retention_s, quota_bytes=quota_bytes)
    uploads.prepare()
    backend = ModelFreeBackend(root / "output", hold=hold, refuse=refuse)
    jobs = JobStore(retention_s, max_active, RecordFolder(root / "output" / RESULTS_SUBFOLDER) if records else None,
                    max_records)
    jobs.load()
    return FalService(backend=backend, uploads=uploads, jobs=jobs, **options)


class DeployedTestServer(TestServer):
    """aiohttp's TestServer cancels a handler when its client goes away (handler_cancellation=True); `serve` and
    ComfyUI's server keep aiohttp's default (False), where the handler runs on and finds out on its next write."""

    async def _make_runner(self, **kwargs) -> web.AppRunner:
        return await super()._make_runner(**{**kwargs, "handler_cancellation": False})


@contextlib.asynccontextmanager
async def serving(service: FalService, as_deployed: bool = False) -> AsyncIterator[TestClient]:
    """A client of `service` served on 127.0.0.1; `as_deployed`: handlers are not cancelled when a client leaves,
    as in `serve` and inside ComfyUI."""
    app = web.Application()
    add_fal_routes(app.router, service)
    async with TestClient((DeployedTestServer if as_deployed else TestServer)(app)) as client:
        yield client


async def raw_request(port: int, head: bytes, body: bytes = b"", read_s: float = 10.0) -> tuple[int, dict | None]:
    """Send `head` (request line and headers, CRLF-terminated) and `body` as they are; (status, JSON body or None)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(1 << 20), read_s)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = None
    return int(status_line.split()[1]), parsed


def closed_within(port: int, head: bytes, trickle: bytes, seconds: float) -> tuple[bool, bytes]:
    """Send `head`, then `trickle` one byte every 0.2 s: (whether the server closed the connection within
    `seconds`, what it answered)."""
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(head + b"\r\n")
        deadline = time.monotonic() + seconds
        answer = b""
        for byte in trickle:
            if time.monotonic() > deadline:
                return False, answer
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.2)
                chunk = sock.recv(65536)
                if not chunk:
                    return True, answer
                answer += chunk
            except TimeoutError:
                continue
            except OSError:
                return True, answer
        return False, answer
