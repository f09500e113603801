"""The protocol's file calls -> uploads stored, and stored files (uploads, result images) served back safely.

    POST <prefix>/storage/auth/token, <prefix>/files/upload           Python upload_file (CDN v3)
    POST <prefix>/storage/upload/initiate, PUT .../upload/slot/<t>    JS storage.upload, Python's fallback
    GET  <prefix>/storage/files/<id>/<name>, <prefix>/results/<id>/<n><ext>   uploaded files, result images

Every file goes out with the one type its format has (never a type a client chose), `nosniff`, a sandboxing
Content-Security-Policy and a Content-Disposition, so that nothing served from this origin (inside ComfyUI:
ComfyUI's origin) runs as a page. Only images are taken as uploads (storage.image_type).
"""
from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Protocol

from aiohttp import web

from .http_limits import Refusal, require_json
from .jobs import JobStore
from .schema import InputError
from .storage import IMAGE_TYPES, Uploads, clean_name, image_type

INITIATE_BODY_BYTES = 64 * 1024
MAX_CONTENT_TYPE_CHARS, MAX_FILE_NAME_CHARS = 255, 1024
_RESULT_NAME = re.compile(r"([0-9]{1,3})(\.[a-z]{1,5})")  # <index><suffix>: ASCII digits, a bounded number


class FalFiles(Protocol):
    """What the file calls need of the service (routes.FalService)."""
    uploads: Uploads
    jobs: JobStore

    def authorized(self, request: web.Request) -> bool: ...

    async def read_body(self, request: web.Request, limit: int) -> bytes: ...

    def base_url(self, request: web.Request) -> str: ...

    def file_url(self, request: web.Request, file_id: str, name: str) -> str: ...


def served_file(path: Path, content_type: str, name: str) -> web.FileResponse:
    """A stored file as a response no browser runs: an image inline with its own type, anything else a download."""
    if content_type not in IMAGE_TYPES.values():
        content_type, disposition = "application/octet-stream", "attachment"
    else:
        disposition = "inline"
    return web.FileResponse(path, headers={
        "Content-Type": content_type, "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Content-Disposition": f'{disposition}; filename="{clean_name(name)}"'})


def served_result(service: FalFiles, request_id: str, name: str) -> tuple[Path, str] | None:
    """(path, content type) of result `name` (e.g. "0.png") of a request, None when there is none."""
    job = service.jobs.get(request_id)
    match = _RESULT_NAME.fullmatch(name)
    if job is None or match is None or int(match[1]) >= len(job.files):
        return None
    served = job.files[int(match[1])]
    return (served.path, served.content_type) if served.suffix == match[2] else None


def result_file(service: FalFiles, rest: list[str]) -> web.StreamResponse:
    served = served_result(service, rest[0], rest[1]) if len(rest) == 2 else None
    if served is None or not served[0].is_file():
        raise Refusal(404, "no such result image (results are kept "
                           f"{service.jobs.retention_s / 3600:g} h after their request)")
    return served_file(served[0], served[1], rest[1])


def initiate_fields(raw: bytes) -> tuple[str, str]:
    """(content_type, file_name) of an initiate body, each a string of bounded length; InputError otherwise."""
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # ValueError: bad JSON, or an integer past Python's digit limit
        body = None
    fields = (body.get("content_type") or "", body.get("file_name") or "") if isinstance(body, dict) else (None, None)
    if not all(isinstance(value, str) for value in fields):
        raise InputError([{"type": "model_attributes_type", "loc": ["body"], "msg":
                           "expected {\"content_type\": str, \"file_name\": str}", "input": None}])
    for name, value, limit in (("content_type", fields[0], MAX_CONTENT_TYPE_CHARS),
                               ("file_name", fields[1], MAX_FILE_NAME_CHARS)):
        if len(value) > limit:
            raise InputError([{"type": "string_too_long", "loc": ["body", name],
                               "msg": f"String should have at most {limit} characters", "input": value[:200]}])
    return fields[0], fields[1]


async def storage_call(service: FalFiles, request: web.Request, segments: list[str]) -> web.StreamResponse:
    uploads = service.uploads
    method = request.method
    if method == "POST" and segments == ["storage", "auth", "token"]:
        token, expires = uploads.issue_token()
        stamp = dt.datetime.fromtimestamp(expires, dt.timezone.utc).isoformat()
        return web.json_response({"token": token, "token_type": "Bearer", "base_url": service.base_url(request),
                                  "expires_at": stamp})
    if method == "POST" and segments == ["files", "upload"]:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if not (scheme == "Bearer" and uploads.token_valid(token)) and not service.authorized(request):
            raise Refusal(401, "upload without a valid token: get one from /storage/auth/token")
        data = await service.read_body(request, uploads.max_bytes)
        file_id, stored = uploads.store(data, image_type(data), request.headers.get("X-Fal-File-Name"))
        return web.json_response({"access_url": service.file_url(request, file_id, stored.name)})
    if method == "POST" and segments == ["storage", "upload", "initiate"]:
        require_json(request)
        _, file_name = initiate_fields(await service.read_body(request, INITIATE_BODY_BYTES))
        slot = uploads.open_slot()
        base = service.base_url(request)
        return web.json_response({"upload_url": f"{base}/storage/upload/slot/{slot}",
                                  "file_url": service.file_url(request, slot, clean_name(file_name))})
    if method == "PUT" and segments[:3] == ["storage", "upload", "slot"] and len(segments) == 4:
        if not uploads.slot_open(segments[3]):
            raise Refusal(404, "no open upload at this URL (each upload URL takes one PUT, within an hour)")
        data = await service.read_body(request, uploads.max_bytes)
        uploads.store(data, image_type(data), None, file_id=segments[3])
        return web.Response(status=200)
    if method == "GET" and segments[:2] == ["storage", "files"] and len(segments) == 4:
        stored = uploads.get(segments[2])
        if stored is None or not stored.path.is_file():
            raise Refusal(404, f"no such uploaded file (uploads are kept {uploads.retention_s / 3600:g} h)")
        return served_file(stored.path, stored.content_type, segments[3])
    raise Refusal(404, f"{method} /{'/'.join(segments)[:200]} is not a storage call this server answers")
