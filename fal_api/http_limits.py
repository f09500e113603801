"""An incoming HTTP request -> refused early, before any work, when it breaks one of the server's limits.

- The Host header must be an IP address, localhost, or a name the operator allowed: a web page on another name that
  resolves to this server (DNS rebinding) is refused, and the URLs the server returns only ever carry a host that
  passed this check.
- A JSON body is taken only as `application/json`: a page on another site can send a text/plain POST without the
  browser asking first (a "simple" request), never an application/json one.
- A body is refused with 413 at once when its declared Content-Length is over the route's limit (nothing is read),
  and is read in chunks under that limit and a deadline: past a grace period it must keep arriving at a minimum
  average rate, else 408 and the connection is closed. A trickled body therefore holds a connection for seconds,
  not for ever.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import urllib.parse

from aiohttp import web

from .settings import ALLOWED_HOSTS_ENV, BODY_GRACE_S, BODY_MIN_RATE

LOCAL_NAMES = frozenset({"localhost"})


class Refusal(Exception):
    """A request the server answers with `status` and fal's error body {"detail", "error_type"}; `close`: the
    connection is closed after the answer (a client too slow to be kept)."""

    def __init__(self, status: int, detail: str, error_type: str | None = None, close: bool = False) -> None:
        super().__init__(detail)
        self.status, self.detail, self.error_type, self.close = status, detail, error_type, close

    def response(self) -> web.Response:
        body: dict[str, object] = {"detail": self.detail}
        if self.error_type is not None:
            body["error_type"] = self.error_type
        response = web.json_response(body, status=self.status)
        if self.close:
            response.force_close()
        return response


def host_name(host: str) -> str | None:
    """The name or address part of a Host header value ("[::1]:8443" -> "::1"), lowercased; None when it is not
    a host[:port] at all."""
    try:
        parts = urllib.parse.urlsplit("//" + host)
        name, _ = parts.hostname, parts.port  # .port raises ValueError for a port that is not one
    except ValueError:
        return None
    if not name or parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    return name.rstrip(".")


@functools.lru_cache(maxsize=256)  # clients send the same few values on every call
def host_problem(host: str | None, allowed: frozenset[str]) -> str | None:
    """Why a request with this Host header is refused (None: it is taken): an IP address, localhost and the
    `allowed` names are taken."""
    if not host:
        return "the request has no Host header"
    name = host_name(host)
    if name is None:
        return f"the Host header {host[:100]!r} is not a host name or address"
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        pass
    if name in LOCAL_NAMES or name in allowed:
        return None
    return (f"this server does not answer to the name {name[:100]!r} (a page on another name that resolves here, "
            f"DNS rebinding, is refused): reach it by its IP address or localhost, or let the operator allow the name "
            f"with --allowed-host {name[:100]} ({ALLOWED_HOSTS_ENV} inside ComfyUI)")


def require_json(request: web.BaseRequest) -> None:
    """Refuses (415) a body that does not say it is JSON."""
    if request.content_type != "application/json":
        given = request.headers.get("Content-Type", "none")[:100]
        raise Refusal(415, f"send the body as JSON with 'Content-Type: application/json' (got {given!r}); other "
                           "types are refused so that a page on another site cannot send a request here",
                      error_type="unsupported_media_type")


def check_declared_length(request: web.BaseRequest, limit: int) -> None:
    """413 before reading when the declared Content-Length is over `limit`."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise Refusal(413, f"the body is {declared} bytes; this call takes at most {limit}", error_type="too_large")


async def read_body(request: web.BaseRequest, limit: int, grace_s: float = BODY_GRACE_S,
                    min_rate: float = BODY_MIN_RATE) -> bytes:
    """The request body, read in chunks: 413 past `limit` bytes (declared or received), 408 when it falls behind
    `grace_s` + received / `min_rate` seconds from the start (the connection is then closed)."""
    check_declared_length(request, limit)
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks: list[bytes] = []
    size = 0
    while True:
        left = start + grace_s + size / min_rate - loop.time()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(request.content.readany(), left)
        except asyncio.TimeoutError:
            raise Refusal(408, f"the body arrived too slowly ({size} bytes in {loop.time() - start:.0f} s; after "
                               f"{grace_s:g} s a body must average {min_rate / 1024:g} KiB/s)",
                          error_type="request_timeout", close=True) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise Refusal(413, f"the body is over {limit} bytes, the most this call takes", error_type="too_large")
        chunks.append(chunk)
