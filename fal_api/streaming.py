"""A run of a streaming endpoint (fal-ai/flux-krea-lora/stream) -> server-sent events, as the clients' `stream`
reads them: one `data:` JSON per event, the last one the output, then the end of the stream.

Python's `fal_client.stream` yields each event's JSON; JS's `fal.stream` emits each as `data` and resolves `done()`
with the last one, when the stream ends. Events: while the request runs, one per new preview, shaped as the output
(`images` with one data-URI JPEG of the sampler's current estimate of the final image, `seed`, `prompt`); then the
output itself (`images` as the endpoint returns them, `timings`, `has_nsfw_concepts`, ...), or, when the request
failed or was cancelled, `{"detail", "error_type"}`. `: ping` comments keep a quiet connection open. A client that
goes away cancels the request: nobody is left to read its result.

Previews are not safety-checked (the checker runs on the final image only), and are small (PREVIEW_SIDE).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import Callable

from aiohttp import web
from PIL import Image

from .jobs import Job

log = logging.getLogger(__name__)

POLL_S, PING_S = 0.05, 10.0
PREVIEW_SIDE = 512  # the longest side of a preview, in pixels
PREVIEW_QUALITY = 80


def preview_entry(image: Image.Image) -> dict:
    """A preview as one entry of `images`: a JPEG data URI at most PREVIEW_SIDE on its longest side."""
    image = image.convert("RGB")
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"url": url, "width": image.width, "height": image.height, "content_type": "image/jpeg"}


def event(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


async def stream_output(request: web.Request, job: Job, cancel: Callable[[Job], None]) -> web.StreamResponse:
    """The events of `job` (accepted and queued) until it ends; `cancel` (the backend's) when the client leaves."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "x-fal-request-id": job.id})
    sent, quiet = 0, 0.0
    seed, prompt = job.seed, getattr(job.arguments, "prompt", None)  # None once the job has ended (no previews)
    try:
        await response.prepare(request)
        while not job.done:
            with job.lock:
                made, preview = job.previews_made, job.preview
            if made > sent and preview is not None:
                await response.write(event({"images": [preview], "seed": seed, "prompt": prompt}))
                sent, quiet = made, 0.0
            await asyncio.sleep(POLL_S)
            quiet += POLL_S
            if quiet >= PING_S:
                await response.write(b": ping\n\n")
                quiet = 0.0
        with job.lock:
            made, preview = job.previews_made, job.preview
        if made > sent and preview is not None and job.error is None:  # made after the last poll: still shown
            await response.write(event({"images": [preview], "seed": seed, "prompt": prompt}))
        if job.error is not None:
            await response.write(event({"detail": job.error, "error_type": job.error_type}))
        else:
            await response.write(event(job.take_output() or {}))
        await response.write_eof()
    except ConnectionError:  # the client closed the stream: nobody reads this request's result
        log.info("fal: the stream of %s was closed by its client; the request is cancelled", job.id)
        if not job.done:
            cancel(job)
    return response
