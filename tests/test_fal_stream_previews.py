"""fal's `/stream` endpoints (fal_api/streaming.py) against a model-free backend: the headers, the preview events
(and the preview images themselves), the `: ping` comments of a quiet stream, what the stream sends around the end
of a request, and a client that leaves.

The stream polls its request every POLL_S and pings after PING_S of quiet; tests that depend on when things happen
run it on a virtual clock (`PollClock`): each poll advances the clock at once, and what the backend does (make a
preview, end the request) is scheduled by poll number, so the events' order is exact and nothing waits.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import types
from collections.abc import Callable

import pytest
from PIL import Image

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import make_service, serving  # noqa: E402

from comfyui_krea.fal_api import streaming  # noqa: E402
from comfyui_krea.fal_api.jobs import CANCELLED, Job  # noqa: E402
from comfyui_krea.fal_api.streaming import PREVIEW_QUALITY, PREVIEW_SIDE, preview_entry  # noqa: E402

T2I = "/fal-ai/flux/krea"
STREAM = "/fal-ai/flux-krea-lora/stream"
PING = ": ping"
PREVIEW = {"url": "data:image/jpeg;base64,AAAA", "width": 8, "height": 8, "content_type": "image/jpeg"}
OUTPUT = {"images": [{"url": "http://x/results/0.png"}], "seed": 1234, "timings": {"inference": 0.5}}


def stream_items(text: str) -> list:
    """The stream's body -> its items in order: PING for each `: ping` comment, the JSON of each `data:` event."""
    items = []
    for block in text.split("\n\n")[:-1]:
        items.append(PING if block == PING else json.loads(block.removeprefix("data: ")))
    assert text.endswith("\n\n") and all(item == PING or isinstance(item, dict) for item in items), text
    return items


class PollClock:
    """Stands in for the stream's asyncio.sleep: poll n (from 1) advances the virtual clock by its delay and runs
    what was scheduled for it with the request's Job."""

    def __init__(self, service, schedule: dict[int, Callable[[Job], None]]) -> None:
        self.service, self.schedule, self.polls, self.now = service, schedule, 0, 0.0

    async def sleep(self, seconds: float) -> None:
        self.polls += 1
        self.now += seconds
        action = self.schedule.get(self.polls)
        if action is not None:
            action(self.service.jobs.all()[0])
        await asyncio.sleep(0)


def on_virtual_time(monkeypatch, service, schedule: dict[int, Callable[[Job], None]]) -> PollClock:
    """Polls every 0.25 s and pings after 1 s of quiet (exact in binary: the ping falls on every 4th quiet poll)."""
    clock = PollClock(service, schedule)
    monkeypatch.setattr(streaming, "asyncio", types.SimpleNamespace(sleep=clock.sleep))
    monkeypatch.setattr(streaming, "POLL_S", 0.25)
    monkeypatch.setattr(streaming, "PING_S", 1.0)
    return clock


def end(job: Job) -> None:
    job.start()
    job.complete(output=dict(OUTPUT))


def streamed(service, body: dict) -> tuple[dict, list]:
    """POST `body` to the stream endpoint: (the response headers, the stream's items)."""
    async def scenario():
        async with serving(service) as client:
            response = await client.post(STREAM, json=body)
            assert response.status == 200
            return dict(response.headers), stream_items(await response.text())

    return asyncio.run(scenario())


def test_a_quiet_stream_sends_a_ping_comment_every_ping_interval_and_fals_headers(tmp_path, monkeypatch):
    service = make_service(tmp_path, hold=True)
    on_virtual_time(monkeypatch, service, {14: end})  # 3.5 s: pings at 1, 2 and 3 s
    headers, items = streamed(service, {"prompt": "a fox", "seed": 1234})
    assert items == [PING, PING, PING, OUTPUT]
    assert headers["Content-Type"] == "text/event-stream" and headers["Cache-Control"] == "no-cache"
    assert headers["x-fal-request-id"] == service.jobs.all()[0].id


def test_each_new_preview_is_sent_once_as_an_output_shaped_event_and_restarts_the_quiet(tmp_path, monkeypatch):
    """A preview made at poll 2 is sent at the next poll, with the request's seed and prompt; the ping comes 1 s
    after it (not 1 s after the stream began), and the preview is never sent again, not even at the end."""
    service = make_service(tmp_path, hold=True)
    on_virtual_time(monkeypatch, service, {2: lambda job: job.set_preview(dict(PREVIEW)), 7: end})
    _, items = streamed(service, {"prompt": "a fox", "seed": 1234})
    assert items == [{"images": [PREVIEW], "seed": 1234, "prompt": "a fox"}, PING, OUTPUT]


def test_a_preview_made_with_the_last_step_is_sent_with_the_seed_and_prompt_before_the_output(tmp_path,
                                                                                               monkeypatch):
    def last_step(job: Job) -> None:
        job.set_preview(dict(PREVIEW))
        end(job)

    service = make_service(tmp_path, hold=True)
    on_virtual_time(monkeypatch, service, {2: last_step})
    _, items = streamed(service, {"prompt": "a fox", "seed": 1234})
    assert items == [{"images": [PREVIEW], "seed": 1234, "prompt": "a fox"}, OUTPUT]


def test_a_cancelled_stream_ends_with_the_error_and_not_the_last_preview(tmp_path, monkeypatch):
    def preview_then_cancel(job: Job) -> None:
        job.set_preview(dict(PREVIEW))
        service.backend.cancel(job)

    service = make_service(tmp_path, hold=True)
    on_virtual_time(monkeypatch, service, {2: preview_then_cancel})
    _, items = streamed(service, {"prompt": "a fox"})
    job = service.jobs.all()[0]
    assert items == [{"detail": job.error, "error_type": CANCELLED}] and job.error


def test_a_client_that_leaves_the_stream_cancels_its_request(tmp_path, monkeypatch):
    service = make_service(tmp_path, hold=True)
    on_virtual_time(monkeypatch, service, {})  # never ends by itself; a ping every 4 polls finds the client gone

    async def scenario() -> Job:
        async with serving(service, as_deployed=True) as client:
            body = json.dumps({"prompt": "a fox"}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(f"POST {STREAM} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            assert b" 200 " in await reader.readuntil(b"\r\n\r\n")
            writer.transport.abort()  # a reset, as a closed browser tab or a killed client
            job = service.jobs.all()[0]
            for _ in range(100):
                if job.done:
                    break
                await asyncio.sleep(0.02)
            return job

    job = asyncio.run(scenario())
    assert job.done and job.error_type == CANCELLED and service.backend.waiting == []


def test_a_preview_is_an_rgb_jpeg_data_uri_at_most_preview_side_with_its_size():
    """Whatever mode the previewer hands over (RGBA here, which JPEG cannot hold), the entry is an RGB JPEG of the
    previews' quality, scaled to fit PREVIEW_SIDE, with the width and height it has; small ones are not enlarged."""
    source = Image.new("RGBA", (2 * PREVIEW_SIDE, PREVIEW_SIDE), (200, 40, 10, 255))
    entry = preview_entry(source)
    assert set(entry) == {"url", "width", "height", "content_type"} and entry["content_type"] == "image/jpeg"
    prefix = "data:image/jpeg;base64,"
    assert entry["url"].startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(entry["url"][len(prefix):], validate=True)))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (entry["width"], entry["height"]) == (PREVIEW_SIDE, PREVIEW_SIDE // 2)
    assert max(abs(a - b) for a, b in zip(image.getpixel((100, 100)), (200, 40, 10))) <= 8
    reference = io.BytesIO()
    Image.new("RGB", (16, 16)).save(reference, format="JPEG", quality=PREVIEW_QUALITY)
    assert image.quantization == Image.open(reference).quantization  # Pillow's tables for that quality
    small = preview_entry(Image.new("L", (40, 30), 128))
    assert (small["width"], small["height"]) == (40, 30)


def test_a_preview_made_after_the_streams_last_poll_is_still_sent_before_the_output(tmp_path):
    """The backend may make a preview and end the request between two polls of the stream (the last steps of a
    short run): that preview is sent, then the output; a request that is not streamed keeps none after its end."""
    service = make_service(tmp_path)
    backend = service.backend
    plain_submit = backend.submit

    async def submit_with_a_last_preview(job: Job, prompt: dict) -> None:
        job.set_preview(dict(PREVIEW))
        await plain_submit(job, prompt)  # ends the request at once, before the stream first looks

    backend.submit = submit_with_a_last_preview

    async def scenario() -> list:
        async with serving(service) as client:
            streamed = await client.post(STREAM, json={"prompt": "x"})
            text = await streamed.text()
            plain = await (await client.post("/queue" + T2I, json={"prompt": "x"})).json()
            assert service.jobs.get(plain["request_id"]).preview is None
        return stream_items(text)

    events = asyncio.run(scenario())
    assert len(events) == 2 and events[0]["images"] == [PREVIEW]
    assert "timings" in events[1] and events[1]["images"][0]["url"].endswith("/0.png")  # the output, last
