"""fal's `/stream` endpoints (fal_api/streaming.py) against a model-free backend: what the stream sends around the
end of a request."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import make_service, serving  # noqa: E402

from comfyui_krea.fal_api.jobs import Job  # noqa: E402

T2I = "/fal-ai/flux/krea"


def test_a_preview_made_after_the_streams_last_poll_is_still_sent_before_the_output(tmp_path):
    """The backend may make a preview and end the request between two polls of the stream (the last steps of a
    short run): that preview is sent, then the output; a request that is not streamed keeps none after its end."""
    service = make_service(tmp_path)
    backend = service.backend
    plain_submit = backend.submit

    async def submit_with_a_last_preview(job: Job, prompt: dict) -> None:
        job.set_preview({"url": "data:image/jpeg;base64,AAAA", "width": 8, "height": 8,
                         "content_type": "image/jpeg"})
        await plain_submit(job, prompt)  # ends the request at once, before the stream first looks

    backend.submit = submit_with_a_last_preview

    async def scenario() -> list[dict]:
        async with serving(service) as client:
            streamed = await client.post("/fal-ai/flux-krea-lora/stream", json={"prompt": "x"})
            text = await streamed.text()
            plain = await (await client.post("/queue" + T2I, json={"prompt": "x"})).json()
            assert service.jobs.get(plain["request_id"]).preview is None
        return [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]

    events = asyncio.run(scenario())
    assert len(events) == 2 and events[0]["images"][0]["url"] == "data:image/jpeg;base64,AAAA"
    assert "timings" in events[1] and events[1]["images"][0]["url"].endswith("/0.png")  # the output, last
