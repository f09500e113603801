"""HTTP requests of the fal clients -> the protocol's endpoints (docs/fal-protocol.md), on aiohttp.

One catch-all route under a prefix ("" for `serve`, "/fal" inside ComfyUI), so that the same dispatcher serves the
Python client's direct calls and the JS client's proxy calls (POST|GET|PUT <prefix>/proxy with x-fal-target-url):

    POST <prefix>/fal-ai/flux/krea[/image-to-image]                   run: waits, answers the output
    POST <prefix>/fal-ai/flux-krea-lora[/image-to-image|/inpainting]  the same, with LoRAs
    POST <prefix>/fal-ai/flux-krea-lora/stream                        run, answered as server-sent events
    POST <prefix>/queue/fal-ai/flux/krea[/image-to-image]             submit: request_id and its URLs
    GET  <prefix>/queue/fal-ai/flux/requests/<id>/status[/stream]     status (?logs=1|true), SSE stream
    GET  <prefix>/queue/fal-ai/flux/requests/<id>                     result (the raw output)
    PUT  <prefix>/queue/fal-ai/flux/requests/<id>/cancel              cancel
    POST <prefix>/storage/auth/token, <prefix>/files/upload           Python upload_file (CDN v3)
    POST <prefix>/storage/upload/initiate, PUT .../upload/slot/<t>    JS storage.upload, Python's fallback
    GET  <prefix>/storage/files/<id>/<name>, <prefix>/results/<id>/<n><ext>   uploaded files, result images

With an API key set (KREA_FAL_API_KEY), every call but the file GETs (unguessable URLs, as fal's CDN) and the slot
PUT (one-time token in its URL) needs `Authorization: Key <it>`. The endpoints served are the rows of endpoints.py;
what runs their workflows is a Backend (backend.py); the file calls are in file_routes.py.

Before any work, every call passes the checks of http_limits.py (the Host header, the declared body size), a run or
submit also its body's type, size and deadline, its fields, the image size cap (size_limit.py), a slot in the queue
(taken in one step), its images and its LoRAs (lora_input.py); every refusal is fal's JSON error shape, and nothing
unexpected reaches a plain 500 with a traceback: what no check foresaw is a 500 in the same shape, logged once.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .backend import Backend, RequestTooLarge, WorkflowRefused
from .endpoints import APPS, ENDPOINTS, Endpoint
from .file_routes import result_file, served_result, storage_call
from .http_limits import Refusal, check_declared_length, host_problem, read_body, require_json
from .image_input import image_for
from .jobs import CANCELLED, COMPLETED, Job, JobStore
from .lora_input import LoraSources, base_config
from .lora_nodes import add_loras
from .records import RecordFolder
from .remote_fetch import fetch_image_bytes
from .schema import InputError, field_error
from .settings import API_KEY_ENV, BODY_GRACE_S, BODY_MIN_RATE, ServiceSettings, truthy
from .size_limit import SIZE_FIELD, check_requested_size
from .storage import Uploads
from .streaming import stream_output
from .workflow import RESULTS_SUBFOLDER, workflow_for

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request body: the largest image as a base64 data URI, and the rest
PROXY_TARGETS = {"fal.run": "", "queue.fal.run": "queue/", "rest.fal.ai": "", "v3.fal.media": ""}
STREAM_POLL_S, STREAM_PING_S = 0.1, 10.0
JobStoreFactory = Callable[..., JobStore]  # (retention_s, max_active, records=) -> the store


def json_error(status: int, detail: object, **extra: object) -> web.Response:
    return web.json_response({"detail": detail, **extra}, status=status)


def parsed_json(raw: bytes) -> object:
    """A request body as JSON, or InputError (422 json_invalid) for anything json.loads cannot take: bad JSON, an
    integer past Python's digit limit, nesting past the recursion limit."""
    try:
        return json.loads(raw or b"null")
    except (ValueError, RecursionError) as err:
        raise InputError([{"type": "json_invalid", "loc": ["body", getattr(err, "pos", 0)],
                           "msg": "JSON decode error", "input": {}, "ctx": {"error": str(err)[:200]}}]) from None


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
    loras: LoraSources | None = None  # None: this server takes no LoRAs
    max_pixels: int = ServiceSettings().max_pixels  # per image made
    allowed_hosts: frozenset[str] = frozenset()  # Host names taken besides IP addresses and localhost
    body_grace_s: float = BODY_GRACE_S
    body_min_rate: float = BODY_MIN_RATE

    @classmethod
    def create(cls, backend: Backend, uploads_folder: Path, settings: ServiceSettings, prefix: str = "",
               job_store: JobStoreFactory = JobStore, uploads: Uploads | None = None) -> FalService:
        """The service over `backend` with `settings`: the uploads folder is made and emptied of earlier runs', the
        records of requests that ended in earlier runs (within retention) are read back from the results folder.
        `job_store` and `uploads` replace the in-process ones (`serve --ray`: state every ingress shares)."""
        if uploads is None:
            uploads = Uploads(uploads_folder, settings.retention_s, quota_bytes=settings.upload_quota_bytes)
            uploads.prepare()
        jobs = job_store(settings.retention_s, settings.max_queue,
                         records=RecordFolder(backend.output_dir / RESULTS_SUBFOLDER))
        restored = jobs.load()
        if restored:
            log.info("fal: %d finished requests of earlier runs are served again", restored)
        loras = LoraSources(backend.model_folder("loras"), lambda name: backend.model_file("loras", name),
                            allow_remote=settings.allow_remote_loras)
        return cls(backend=backend, uploads=uploads, jobs=jobs, prefix=prefix, api_key=settings.api_key,
                   allow_remote_images=settings.allow_remote_images, max_pixels=settings.max_pixels,
                   allowed_hosts=frozenset(settings.allowed_hosts), loras=loras)

    # -- dispatch -------------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            problem = host_problem(request.headers.get("Host"), self.allowed_hosts)
            if problem is not None:
                raise Refusal(400, problem, error_type="host_refused")
            check_declared_length(request, MAX_BODY_BYTES)
            segments, query = self.target(request)
            return await self.route(request, segments, query)
        except InputError as err:
            return json_error(422, err.detail)
        except Refusal as refusal:
            response = refusal.response()
            if refusal.close:  # answered now and closed: aiohttp would otherwise linger reading the rest (10 s)
                with contextlib.suppress(ConnectionError):
                    await response.prepare(request)
                    await response.write_eof()
                request.protocol.force_close()
            return response
        except Exception as err:  # what no check foresaw: fal's error shape, one log entry
            log.exception("fal: %s %s failed", request.method, request.path[:200])
            return json_error(500, f"the server failed on this request ({type(err).__name__}); it is logged",
                              error_type="internal_error")

    def target(self, request: web.Request) -> tuple[list[str], dict[str, str]]:
        """The call's path segments and query; for the JS client's proxy calls, those of x-fal-target-url."""
        tail = request.match_info.get("tail", "")
        query: dict[str, str] = dict(request.rel_url.query)
        if tail == "proxy":
            target = request.headers.get("x-fal-target-url", "")
            try:
                parts = urllib.parse.urlsplit(target)
                hostname = parts.hostname
            except ValueError:
                hostname = None
            if hostname is None or parts.scheme != "https" or hostname not in PROXY_TARGETS:
                raise Refusal(400, f"x-fal-target-url {target[:200]!r} is not a fal URL this server answers "
                                   f"(hosts: {', '.join(PROXY_TARGETS)})")
            tail = PROXY_TARGETS[hostname] + parts.path.lstrip("/")
            query = dict(urllib.parse.parse_qsl(parts.query))
        return [s for s in tail.split("/") if s], query

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
            return result_file(self, segments[1:])
        if segments[:1] == ["storage"] or segments[:1] == ["files"]:
            return await storage_call(self, request, segments)
        if segments[:1] == ["queue"]:
            rest = segments[1:]
            if method == "POST":
                return await self.submit(request, "/".join(rest))
            if "/".join(rest[:2]) in APPS and len(rest) >= 4 and rest[2] == "requests":
                return await self.request_call(request, rest[3], rest[4:], query)
            return json_error(404, f"no queue endpoint {'/'.join(rest)[:200]!r} (this server runs "
                                   f"{', '.join(ENDPOINTS)})")
        if method == "POST":
            return await self.run(request, "/".join(segments))
        return json_error(405 if "/".join(segments) in ENDPOINTS else 404,
                          f"{method} /{'/'.join(segments)[:200]} is not served here (POST {', '.join(ENDPOINTS)})")

    def authorized(self, request: web.Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("Authorization", "")
        # Header values may hold any character (aiohttp keeps undecodable bytes as surrogates): compare bytes.
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Key {self.api_key}".encode())

    async def read_body(self, request: web.Request, limit: int) -> bytes:
        return await read_body(request, limit, self.body_grace_s, self.body_min_rate)

    # -- taking a request -----------------------------------------------------------------------------------
    def base_url(self, request: web.Request) -> str:
        """scheme://host[:port]<prefix> as the client reached the server; the Host passed host_problem."""
        return f"{request.scheme}://{request.host}{self.prefix}"

    def file_url(self, request: web.Request, file_id: str, name: str) -> str:
        return f"{self.base_url(request)}/storage/files/{file_id}/{name}"

    def queue_urls(self, job: Job) -> dict[str, str]:
        url = f"{job.base_url}/queue/{ENDPOINTS[job.endpoint].app}/requests/{job.id}"
        return {"response_url": url, "status_url": url + "/status", "cancel_url": url + "/cancel"}

    async def accept(self, request: web.Request, endpoint_id: str, run: bool = False) -> Job | web.Response:
        """Checks from the cheapest on (body, fields, the size cap, a slot in the queue, the images, the LoRAs, what
        the backend checks); then queues the workflow. Each input image is decoded once, here, and handed to the
        backend as it is. A run of a streaming endpoint asks the backend for previews."""
        endpoint = ENDPOINTS.get(endpoint_id)
        if endpoint is None:
            return json_error(404, f"no endpoint {endpoint_id[:200]!r}: this server runs {', '.join(ENDPOINTS)}")
        require_json(request)
        arguments = endpoint.parse(parsed_json(await self.read_body(request, MAX_BODY_BYTES)))
        check_requested_size(arguments, self.max_pixels)
        self.jobs.expire()
        self.uploads.expire()
        seed = arguments.seed if arguments.seed is not None else secrets.randbelow(2**32)
        job = Job(endpoint=endpoint.id, arguments=arguments, seed=seed, base_url=self.base_url(request),
                  keep_output=not getattr(arguments, "sync_mode", False), wants_previews=run and endpoint.streams)
        if not self.jobs.add_if_room(job):  # the slot is taken before anything is awaited
            return json_error(503, f"the queue is full ({self.jobs.max_active} requests waiting or running); try "
                                   "again when some have finished", error_type="queue_full")
        try:
            images: dict[str, str] = {}
            for name in endpoint.image_fields:
                image = await image_for(getattr(arguments, name), lambda url, f=name: self.local_file(url, f),
                                        self.allow_remote_images, self.fetch, self.max_pixels, field=name)
                images[name] = self.backend.image_reference(job, image)
            prompt = workflow_for(endpoint, arguments, seed, job.id, images)
            await self.add_loras(prompt, getattr(arguments, "loras", None) or [])
            await self.backend.submit(job, prompt)
        except RequestTooLarge as err:
            self.refused(job)
            raise field_error(size_field(endpoint), str(err)) from None
        except WorkflowRefused as err:
            self.refused(job)
            return json_error(500, f"this server cannot run the workflow: {err}", error_type="workflow_refused")
        except BaseException:
            self.refused(job)
            raise
        log.info("fal request %s (%s) queued", job.id, endpoint.id)
        return job

    async def add_loras(self, prompt: dict, loras: list) -> None:
        """The request's LoRAs, resolved and checked against the workflow's base transformer, as LoraLoaderModelOnly
        nodes in front of its sampler."""
        if not loras:
            return
        if self.loras is None:
            raise field_error("loras", "this server takes no LoRAs")
        add_loras(prompt, await self.loras.resolve(loras, base_config(prompt, self.backend.model_file)))

    def refused(self, job: Job) -> None:
        """A request refused after its slot was taken: no record, and what was handed on for it is given back."""
        self.jobs.discard(job)
        job.complete(error="the request was refused", error_type="refused")

    def local_file(self, url: str, field_name: str = "image_url") -> Path | None:
        """The file this server serves at `url` (an upload or a result), None when the URL is not this server's;
        InputError on `field_name` when it is this server's but names nothing (any more)."""
        parts = urllib.parse.urlsplit(url)
        segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
        prefix = [s for s in self.prefix.split("/") if s]
        if segments[:len(prefix)] != prefix:
            return None
        rest = segments[len(prefix):]
        if rest[:2] == ["storage", "files"] and len(rest) >= 3:
            stored = self.uploads.get(rest[2])
            if stored is None:
                raise field_error(field_name, "no uploaded file at this URL on this server (uploads are kept "
                                               f"{self.uploads.retention_s / 3600:g} h)", value=url[:200])
            return stored.path
        if rest[:1] == ["results"] and len(rest) == 3:
            served = served_result(self, rest[1], rest[2])
            if served is None:
                raise field_error(field_name, "no result image at this URL on this server (results are kept "
                                               f"{self.jobs.retention_s / 3600:g} h)", value=url[:200])
            return served[0]
        return None

    # -- run and queue --------------------------------------------------------------------------------------
    async def run(self, request: web.Request, endpoint: str) -> web.Response:
        job = await self.accept(request, endpoint, run=True)
        if isinstance(job, web.Response):
            return job
        if job.wants_previews:
            return await stream_output(request, job, self.backend.cancel)
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
                          f"{request.method} .../requests/<id>/{'/'.join(action)[:200]} is not a queue call")

    def result(self, job: Job) -> web.Response:
        headers = {"x-fal-request-id": job.id}
        if not job.done:
            return json_error(400, f"the request is {job.status}; its result is ready when its status is "
                                   f"{COMPLETED}", error_type="not_ready")
        if job.error is not None:
            status = 400 if job.error_type == CANCELLED else 500
            return web.json_response({"detail": job.error, "error_type": job.error_type}, status=status,
                                     headers={**headers, "x-fal-error-type": job.error_type or "error"})
        output = job.take_output()
        if output is None:
            return json_error(404, "the output of a sync_mode request is handed out once and not kept (fal keeps "
                                   "none either)", error_type="not_kept")
        return web.json_response(output, headers=headers)

    async def stream_status(self, request: web.Request, job: Job, logs: bool) -> web.StreamResponse:
        """Server-sent events: one status JSON per change (new log lines only), `: ping` while waiting, closed
        after COMPLETED. A client that goes away ends it quietly."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "x-fal-request-id": job.id})
        sent_logs, last, quiet = 0, None, 0.0
        try:
            await response.prepare(request)
            while True:
                body = job.status_json(self.queue_urls(job), logs, self.backend.position(job), since_log=sent_logs)
                new_logs = len(body["logs"] or [])
                key = (body["status"], body.get("queue_position"), sent_logs + new_logs)  # logs counted in all
                if key != last or body["status"] == COMPLETED:
                    await response.write(f"data: {json.dumps(body)}\n\n".encode())
                    sent_logs += new_logs
                    last, quiet = key, 0.0
                if body["status"] == COMPLETED:
                    break
                await asyncio.sleep(STREAM_POLL_S)
                quiet += STREAM_POLL_S
                if quiet >= STREAM_PING_S:
                    await response.write(b": ping\n\n")
                    quiet = 0.0
            await response.write_eof()
        except ConnectionError:  # aiohttp's ClientConnectionResetError is one: the client closed the stream
            log.debug("fal: the status stream of %s was closed by its client", job.id)
        return response


def size_field(endpoint: Endpoint) -> str:
    """The request field that sets the size of what an endpoint makes: its input image, or image_size."""
    return endpoint.image_fields[0] if endpoint.image_fields else SIZE_FIELD


def add_fal_routes(routes: web.RouteTableDef | web.UrlDispatcher, service: FalService) -> None:
    """The one catch-all route of the protocol, under the service's prefix."""
    path = f"{service.prefix}/{{tail:.*}}"
    if isinstance(routes, web.RouteTableDef):
        routes.route("*", path)(service.handle)
    else:
        routes.add_route("*", path, service.handle)
