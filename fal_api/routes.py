"""HTTP requests of the fal clients -> the protocol's endpoints (docs/fal-protocol.md), on aiohttp.

One catch-all route under a prefix ("" for `serve`, "/fal" inside ComfyUI), so that the same dispatcher serves the
Python client's direct calls and the JS client's proxy calls (POST|GET|PUT <prefix>/proxy with x-fal-target-url):

    POST <prefix>/fal-ai/flux/krea[/image-to-image]                   run: waits, answers the output
    POST <prefix>/queue/fal-ai/flux/krea[/image-to-image]             submit: request_id and its URLs
    GET  <prefix>/queue/fal-ai/flux/requests/<id>/status[/stream]     status (?logs=1|true), SSE stream
    GET  <prefix>/queue/fal-ai/flux/requests/<id>                     result (the raw output)
    PUT  <prefix>/queue/fal-ai/flux/requests/<id>/cancel              cancel
    POST <prefix>/storage/auth/token, <prefix>/files/upload           Python upload_file (CDN v3)
    POST <prefix>/storage/upload/initiate, PUT .../upload/slot/<t>    JS storage.upload, Python's fallback
    GET  <prefix>/storage/files/<id>/<name>, <prefix>/results/<id>/<n><ext>   uploaded files, result images

With an API key set (KREA_FAL_API_KEY), every call but the file GETs (unguessable URLs, as fal's CDN) and the slot
PUT (one-time token in its URL) needs `Authorization: Key <it>`. The endpoints served are the rows of endpoints.py;
what runs their workflows is a Backend (backend.py).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .backend import Backend, WorkflowRefused
from .endpoints import APPS, ENDPOINTS
from .image_input import image_for
from .jobs import CANCELLED, COMPLETED, Job, JobStore
from .remote_fetch import fetch_image_bytes
from .schema import InputError, field_error
from .settings import API_KEY_ENV, ServiceSettings, truthy
from .storage import Uploads, UploadTooLarge, clean_name, read_limited
from .workflow import workflow_for

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request body: the largest image as a base64 data URI, and the rest
PROXY_TARGETS = {"fal.run": "", "queue.fal.run": "queue/", "rest.fal.ai": "", "v3.fal.media": ""}
STREAM_POLL_S, STREAM_PING_S = 0.1, 10.0


def json_error(status: int, detail: object, **extra: object) -> web.Response:
    return web.json_response({"detail": detail, **extra}, status=status)


@dataclass
class FalService:
    """The protocol's state: requests, uploads, the backend, the options; `handle` is the aiohttp handler."""
    backend: Backend
    uploads: Uploads
    jobs: JobStore
    prefix: str = ""
    api_key: str | None = None
    allow_remote_images: bool = False
    fetch: Callable[[str], Awaitable[bytes]] = field(default=fetch_image_bytes)

    @classmethod
    def create(cls, backend: Backend, uploads_folder: Path, settings: ServiceSettings, prefix: str = "") -> FalService:
        """The service over `backend` with `settings`; the uploads folder is made and emptied of earlier runs'."""
        uploads = Uploads(uploads_folder, settings.retention_s)
        uploads.prepare()
        return cls(backend=backend, uploads=uploads, jobs=JobStore(settings.retention_s, settings.max_queue),
                   prefix=prefix, api_key=settings.api_key, allow_remote_images=settings.allow_remote_images)

    # -- dispatch -------------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        query = request.rel_url.query
        if tail == "proxy":
            target = request.headers.get("x-fal-target-url", "")
            parts = urllib.parse.urlsplit(target)
            if parts.scheme != "https" or parts.hostname not in PROXY_TARGETS:
                return json_error(400, f"x-fal-target-url {target[:200]!r} is not a fal URL this server answers "
                                       f"(hosts: {', '.join(PROXY_TARGETS)})")
            tail = PROXY_TARGETS[parts.hostname] + parts.path.lstrip("/")
            query = dict(urllib.parse.parse_qsl(parts.query))
        segments = [s for s in tail.split("/") if s]
        try:
            return await self.route(request, segments, query)
        except InputError as err:
            return json_error(422, err.detail)
        except UploadTooLarge as err:
            return json_error(413, str(err))

    async def route(self, request: web.Request, segments: list[str], query) -> web.StreamResponse:
        method = request.method
        public = (method == "GET" and segments[:1] == ["results"]) or \
                 (method == "GET" and segments[:2] == ["storage", "files"]) or \
                 (method == "PUT" and segments[:3] == ["storage", "upload", "slot"]) or \
                 (method == "POST" and segments == ["files", "upload"])
        if not public and not self.authorized(request):
            return json_error(401, f"missing or wrong credentials: send 'Authorization: Key <key>' with the key "
                                   f"this server was given ({API_KEY_ENV})")
        if segments[:1] == ["results"] and method == "GET":
            return self.result_file(segments[1:])
        if segments[:1] == ["storage"] or segments[:1] == ["files"]:
            return await self.storage(request, segments, query)
        if segments[:1] == ["queue"]:
            rest = segments[1:]
            if method == "POST":
                return await self.submit(request, "/".join(rest))
            if "/".join(rest[:2]) in APPS and len(rest) >= 4 and rest[2] == "requests":
                return await self.request_call(request, rest[3], rest[4:], query)
            return json_error(404, f"no queue endpoint {'/'.join(rest)!r} (this server runs {', '.join(ENDPOINTS)})")
        if method == "POST":
            return await self.run(request, "/".join(segments))
        return json_error(405 if "/".join(segments) in ENDPOINTS else 404,
                          f"{method} /{'/'.join(segments)} is not served here (POST {', '.join(ENDPOINTS)})")

    def authorized(self, request: web.Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Key {self.api_key}".encode())

    # -- taking a request -----------------------------------------------------------------------------------
    def base_url(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}{self.prefix}"

    def queue_urls(self, job: Job) -> dict[str, str]:
        url = f"{job.base_url}/queue/{ENDPOINTS[job.endpoint].app}/requests/{job.id}"
        return {"response_url": url, "status_url": url + "/status", "cancel_url": url + "/cancel"}

    async def accept(self, request: web.Request, endpoint_id: str) -> Job | web.Response:
        """Checks from the cheapest on (body, fields, room in the queue, the images); then queues the workflow.
        Each input image is decoded once, here, and handed to the backend as it is."""
        endpoint = ENDPOINTS.get(endpoint_id)
        if endpoint is None:
            return json_error(404, f"no endpoint {endpoint_id!r}: this server runs {', '.join(ENDPOINTS)}")
        raw = await read_limited(request.content, MAX_BODY_BYTES)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError([{"type": "json_invalid", "loc": ["body", getattr(err, "pos", 0)],
                               "msg": "JSON decode error", "input": {}, "ctx": {"error": str(err)[:200]}}]) from None
        arguments = endpoint.parse(body)
        self.jobs.expire()
        self.uploads.expire()
        if self.jobs.active() >= self.jobs.max_active:
            return json_error(503, f"the queue is full ({self.jobs.max_active} requests waiting or running); try "
                                   "again when some have finished", error_type="queue_full")
        seed = arguments.seed if arguments.seed is not None else secrets.randbelow(2**32)
        job = Job(endpoint=endpoint.id, arguments=arguments, seed=seed, base_url=self.base_url(request))
        images: dict[str, str] = {}
        try:
            for name in endpoint.image_fields:
                image = await image_for(getattr(arguments, name), self.local_file, self.allow_remote_images,
                                        self.fetch)
                images[name] = self.backend.image_reference(job, image)
        except BaseException:
            job.complete(error="the request was refused", error_type="refused")  # gives back what was handed on
            raise
        prompt = workflow_for(endpoint, arguments, seed, job.id, images)
        self.jobs.add(job)
        try:
            await self.backend.submit(job, prompt)
        except WorkflowRefused as err:
            job.complete(error=str(err), error_type="workflow_refused")
            return json_error(500, f"this server cannot run the workflow: {err}", error_type="workflow_refused")
        except Exception as err:  # the record must not wait forever for a run that never started
            job.complete(error=f"{type(err).__name__}: {err}", error_type="internal_error")
            raise
        log.info("fal request %s (%s) queued", job.id, endpoint)
        return job

    def local_file(self, url: str) -> Path | None:
        """The file this server serves at `url` (an upload or a result), None when the URL is not this server's."""
        parts = urllib.parse.urlsplit(url)
        segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
        prefix = [s for s in self.prefix.split("/") if s]
        if segments[:len(prefix)] != prefix:
            return None
        rest = segments[len(prefix):]
        if rest[:2] == ["storage", "files"] and len(rest) >= 3:
            stored = self.uploads.get(rest[2])
            if stored is None:
                raise field_error("image_url", "no uploaded file at this URL on this server (uploads are kept "
                                               f"{self.uploads.retention_s / 3600:g} h)", value=url[:200])
            return stored.path
        if rest[:1] == ["results"] and len(rest) == 3:
            served = self.served_result(rest[1], rest[2])
            if served is None:
                raise field_error("image_url", "no result image at this URL on this server (results are kept "
                                               f"{self.jobs.retention_s / 3600:g} h)", value=url[:200])
            return served[0]
        return None

    # -- run and queue --------------------------------------------------------------------------------------
    async def run(self, request: web.Request, endpoint: str) -> web.Response:
        job = await self.accept(request, endpoint)
        if isinstance(job, web.Response):
            return job
        await job.wait()
        return self.result(job)

    async def submit(self, request: web.Request, endpoint: str) -> web.Response:
        job = await self.accept(request, endpoint)
        if isinstance(job, web.Response):
            return job
        return web.json_response({"status": "IN_QUEUE", "request_id": job.id, **self.queue_urls(job),
                                  "queue_position": self.backend.position(job) or 0},
                                 headers={"x-fal-request-id": job.id})

    async def request_call(self, request: web.Request, request_id: str, action: list[str], query) -> web.StreamResponse:
        job = self.jobs.get(request_id)
        if job is None:
            return json_error(404, f"no request {request_id[:80]!r} on this server (finished requests are kept "
                                   f"{self.jobs.retention_s / 3600:g} h)")
        logs = truthy(query.get("logs"))
        if request.method == "GET" and action == []:
            return self.result(job)
        if request.method == "GET" and action == ["status"]:
            return web.json_response(job.status_json(self.queue_urls(job), logs, self.backend.position(job)))
        if request.method == "GET" and action == ["status", "stream"]:
            return await self.stream_status(request, job, logs)
        if request.method == "PUT" and action == ["cancel"]:
            if job.done:
                return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
            self.backend.cancel(job)
            return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)
        return json_error(404 if request.method in ("GET", "PUT") else 405,
                          f"{request.method} .../requests/<id>/{'/'.join(action)} is not a queue call")

    def result(self, job: Job) -> web.Response:
        headers = {"x-fal-request-id": job.id}
        if not job.done:
            return json_error(400, f"the request is {job.status}; its result is ready when its status is "
                                   f"{COMPLETED}", error_type="not_ready")
        if job.error is not None:
            status = 400 if job.error_type == CANCELLED else 500
            return web.json_response({"detail": job.error, "error_type": job.error_type}, status=status,
                                     headers={**headers, "x-fal-error-type": job.error_type or "error"})
        return web.json_response(job.output, headers=headers)

    async def stream_status(self, request: web.Request, job: Job, logs: bool) -> web.StreamResponse:
        """Server-sent events: one status JSON per change (new log lines only), `: ping` while waiting, closed
        after COMPLETED."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "x-fal-request-id": job.id})
        await response.prepare(request)
        sent_logs, last, quiet = 0, None, 0.0
        while True:
            body = job.status_json(self.queue_urls(job), logs, self.backend.position(job), since_log=sent_logs)
            key = (body["status"], body.get("queue_position"), len(body["logs"] or []))
            if key != last or body["status"] == COMPLETED:
                await response.write(f"data: {json.dumps(body)}\n\n".encode())
                sent_logs += len(body["logs"] or [])
                last, quiet = key, 0.0
            if body["status"] == COMPLETED:
                break
            await asyncio.sleep(STREAM_POLL_S)
            quiet += STREAM_POLL_S
            if quiet >= STREAM_PING_S:
                await response.write(b": ping\n\n")
                quiet = 0.0
        await response.write_eof()
        return response

    # -- files ----------------------------------------------------------------------------------------------
    def served_result(self, request_id: str, name: str) -> tuple[Path, str] | None:
        job = self.jobs.get(request_id)
        stem, dot, suffix = name.partition(".")
        if job is None or not stem.isdigit() or int(stem) >= len(job.files):
            return None
        served = job.files[int(stem)]
        return (served.path, served.content_type) if served.suffix == dot + suffix else None

    def result_file(self, rest: list[str]) -> web.StreamResponse:
        served = self.served_result(rest[0], rest[1]) if len(rest) == 2 else None
        if served is None or not served[0].is_file():
            return json_error(404, "no such result image (results are kept "
                                   f"{self.jobs.retention_s / 3600:g} h after their request)")
        return web.FileResponse(served[0], headers={"Content-Type": served[1]})

    async def storage(self, request: web.Request, segments: list[str], query) -> web.StreamResponse:
        method = request.method
        if method == "POST" and segments == ["storage", "auth", "token"]:
            token, expires = self.uploads.issue_token()
            stamp = dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat()
            return web.json_response({"token": token, "token_type": "Bearer", "base_url": self.base_url(request),
                                      "expires_at": stamp})
        if method == "POST" and segments == ["files", "upload"]:
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if not (scheme == "Bearer" and self.uploads.token_valid(token)) and not self.authorized(request):
                return json_error(401, "upload without a valid token: get one from /storage/auth/token")
            data = await read_limited(request.content, self.uploads.max_bytes)
            file_id, stored = self.uploads.store(data, request.content_type, request.headers.get("X-Fal-File-Name"))
            return web.json_response({"access_url": self.file_url(request, file_id, stored.name)})
        if method == "POST" and segments == ["storage", "upload", "initiate"]:
            try:
                body = json.loads(await read_limited(request.content, 64 * 1024) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = None
            if not isinstance(body, dict) or not isinstance(body.get("content_type", ""), str) \
                    or not isinstance(body.get("file_name", ""), str):
                raise InputError([{"type": "model_attributes_type", "loc": ["body"], "msg":
                                   "expected {\"content_type\": str, \"file_name\": str}", "input": None}])
            slot = self.uploads.open_slot(body.get("content_type") or "application/octet-stream",
                                          body.get("file_name"))
            base = self.base_url(request)
            upload_url = f"{base}/storage/upload/slot/{slot}"
            file_url = f"{base}/storage/files/{slot}/{clean_name(body.get('file_name'))}"
            return web.json_response({"upload_url": upload_url, "file_url": file_url})
        if method == "PUT" and segments[:3] == ["storage", "upload", "slot"] and len(segments) == 4:
            slot = self.uploads.take_slot(segments[3])
            if slot is None:
                return json_error(404, "no open upload at this URL (each upload URL takes one PUT)")
            data = await read_limited(request.content, self.uploads.max_bytes)
            self.uploads.store(data, request.content_type or slot[0], slot[1], file_id=segments[3])
            return web.Response(status=200)
        if method == "GET" and segments[:2] == ["storage", "files"] and len(segments) == 4:
            stored = self.uploads.get(segments[2])
            if stored is None or not stored.path.is_file():
                return json_error(404, "no such uploaded file (uploads are kept "
                                       f"{self.uploads.retention_s / 3600:g} h)")
            return web.FileResponse(stored.path, headers={"Content-Type": stored.content_type})
        return json_error(404, f"{method} /{'/'.join(segments)} is not a storage call this server answers")

    def file_url(self, request: web.Request, file_id: str, name: str) -> str:
        return f"{self.base_url(request)}/storage/files/{file_id}/{name}"


def add_fal_routes(routes: web.RouteTableDef | web.UrlDispatcher, service: FalService) -> None:
    """The one catch-all route of the protocol, under the service's prefix."""
    path = f"{service.prefix}/{{tail:.*}}"
    if isinstance(routes, web.RouteTableDef):
        routes.route("*", path)(service.handle)
    else:
        routes.add_route("*", path, service.handle)
