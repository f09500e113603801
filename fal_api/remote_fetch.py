"""An image_url of another host -> its bytes (`fetch_image_bytes`), or a LoRA URL -> a file (`fetch_to_file`),
fetched only from the public addresses address_guard.py allows.

The addresses that passed the guard are pinned into the connector, so the connection goes to exactly those
addresses and a second DNS answer (rebinding) cannot swap in another. Redirects are followed by hand, each one
checked the same way, and the body is read under a size and a time limit (a declared Content-Length over it is
refused before the body is read).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from .address_guard import RemoteImageError, Resolver, checked_addresses, checked_url, refused_address, system_resolver

logger = logging.getLogger(__name__)

__all__ = [
    "ConnectorFactory",
    "FetchLimits",
    "RemoteImageError",
    "Resolver",
    "fetch_image_bytes",
    "fetch_to_file",
    "pinned_connector",
    "refused_address",
    "system_resolver",
]

ConnectorFactory = Callable[[dict[str, list[str]]], aiohttp.BaseConnector]
"""{host: its already-checked addresses} -> the connector one hop's request goes through."""
T = TypeVar("T")
BodyReader = Callable[[aiohttp.ClientResponse, str, int], Awaitable[T]]
"""(the 2xx response, its host, the byte limit) -> what the fetch returns, read within the limit."""


@dataclass(frozen=True)
class FetchLimits:
    """How much one fetch may read, how long it may take (all hops together), and how many redirects it follows."""

    max_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 20.0
    max_redirects: int = 3


_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


class UnpinnedHostError(socket.gaierror):
    """The pinned connector was asked for a host it was not given; aiohttp reports it as a DNS failure."""

    def __init__(self, message: str) -> None:
        # (errno, strerror): aiohttp's ClientConnectorError shows strerror, so the reason reaches the message.
        super().__init__(socket.EAI_NONAME, message)


def _pin_key(host: str) -> str:
    # aiohttp may hand the resolver "name." where the URL said "name..", and hosts are case-insensitive; the key
    # only selects which checked addresses to use, so folding these together cannot widen what is reachable.
    return host.rstrip(".").lower()


class _PinnedResolver(AbstractResolver):
    """Answers with the addresses it was given, and for no other host; never asks DNS."""

    def __init__(self, pinned: dict[str, list[str]]) -> None:
        self._pinned = {_pin_key(host): list(addresses) for host, addresses in pinned.items()}

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        addresses = self._pinned.get(_pin_key(host))
        if not addresses:
            raise UnpinnedHostError(f"host {host!r} is not pinned to checked addresses; refusing to resolve it")
        results: list[ResolveResult] = []
        for address in addresses:
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (socket.AF_UNSPEC, address_family):
                continue
            results.append(ResolveResult(hostname=host, host=address, port=port, family=address_family, proto=0,
                                         flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not results:
            raise UnpinnedHostError(f"host {host!r} has no pinned address of the requested family")
        return results

    async def close(self) -> None:
        return None


def pinned_connector(pinned: dict[str, list[str]]) -> aiohttp.TCPConnector:
    """A TCPConnector that connects each host in `pinned` only to its listed addresses and refuses other hosts.

    The addresses are the ones the caller already checked, so DNS cannot change between the check and the
    connection. aiohttp connects to IP-literal hosts without asking the resolver; callers check those themselves.
    """
    # No DNS cache: the pinned resolver is the whole answer, and a cache shared by hops would only blur that.
    return aiohttp.TCPConnector(resolver=_PinnedResolver(pinned), use_dns_cache=False)
async def fetch_image_bytes(url: str, *, resolver: Resolver = system_resolver,
                            connector_factory: ConnectorFactory = pinned_connector,
                            limits: FetchLimits = FetchLimits()) -> bytes:  # noqa: B008 - frozen, so a safe default
    """The body of the http(s) `url`, following redirects, each hop checked to reach only public addresses.

    Raises RemoteImageError for a refused URL or address, a failed connection, a non-2xx answer, a body over
    `limits.max_bytes`, more than `limits.max_redirects` redirects, or taking longer than `limits.timeout_s`
    (all hops together).
    """
    return await _bounded(_fetch(url, resolver, connector_factory, limits, _read_limited), limits)


async def fetch_to_file(url: str, destination: Path, *, resolver: Resolver = system_resolver,
                        connector_factory: ConnectorFactory = pinned_connector,
                        limits: FetchLimits = FetchLimits()) -> str:  # noqa: B008 - frozen, so a safe default
    """The body of `url` written to the new file `destination` (the caller removes it on failure), under the same
    checks and limits as fetch_image_bytes; returns the body's sha256 (hex)."""

    async def write(response: aiohttp.ClientResponse, host: str, max_bytes: int) -> str:
        digest = hashlib.sha256()
        with destination.open("xb") as out:
            async for chunk in _limited_chunks(response, host, max_bytes):
                digest.update(chunk)
                out.write(chunk)
        return digest.hexdigest()

    return await _bounded(_fetch(url, resolver, connector_factory, limits, write), limits)


async def _bounded(fetch: Awaitable[T], limits: FetchLimits) -> T:
    try:
        return await asyncio.wait_for(fetch, timeout=limits.timeout_s)
    except asyncio.TimeoutError:
        # aiohttp's own timeouts are TimeoutErrors too; both end here, with one message.
        raise RemoteImageError(f"image_url fetch timed out after {limits.timeout_s:g} s") from None


async def _fetch(url: str, resolver: Resolver, connector_factory: ConnectorFactory, limits: FetchLimits,
                 read: BodyReader[T]) -> T:
    try:
        current = URL(url)
    except (ValueError, TypeError) as exc:
        raise RemoteImageError(f"image_url is not a valid URL: {exc}") from None
    redirects = 0
    while True:
        host, port = checked_url(current)
        addresses = await checked_addresses(host, port, resolver)
        logger.debug("fetching image_url host %r port %d via %s", host, port, ", ".join(addresses))
        status, body, location = await _request(current.with_fragment(None), host, {host: addresses},
                                                connector_factory, limits, read)
        if location is None:
            if not 200 <= status < 300:
                raise RemoteImageError(f"image_url host {host!r} answered HTTP {status}; expected 2xx")
            assert body is not None
            return body
        redirects += 1
        if redirects > limits.max_redirects:
            raise RemoteImageError(f"image_url redirected more than {limits.max_redirects} times "
                                   f"(last from host {host!r})")
        try:
            current = current.join(URL(location))
        except (ValueError, TypeError) as exc:
            raise RemoteImageError(f"image_url host {host!r} redirected to an invalid URL: {exc}") from None
        logger.debug("image_url host %r redirected (%d of at most %d)", host, redirects, limits.max_redirects)


async def _request(url: URL, host: str, pinned: dict[str, list[str]], connector_factory: ConnectorFactory,
                   limits: FetchLimits, read: BodyReader[T]) -> tuple[int, T | None, str | None]:
    """One hop: (status, body, None) for a final answer, (status, None, Location) for a redirect."""
    connector = connector_factory(pinned)
    timeout = aiohttp.ClientTimeout(total=limits.timeout_s)
    # trust_env=False: a proxy from the environment would connect on our behalf, past the pinned addresses.
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        try:
            # identity: Content-Length then bounds what is read, and no decompression bomb reaches the reader.
            async with session.get(url, allow_redirects=False, headers={"Accept-Encoding": "identity"}) as response:
                if response.status in _REDIRECT_STATUSES:
                    location = response.headers.get(aiohttp.hdrs.LOCATION)
                    if not location:
                        raise RemoteImageError(f"image_url host {host!r} answered HTTP {response.status} "
                                               "without a Location to redirect to")
                    return response.status, None, location
                if not 200 <= response.status < 300:
                    return response.status, None, None
                return response.status, await read(response, host, limits.max_bytes), None
        except asyncio.TimeoutError:
            raise  # the caller words timeouts; aiohttp's are ClientErrors too
        except aiohttp.ClientError as exc:
            raise RemoteImageError(f"image_url host {host!r} could not be fetched: {exc}") from exc


async def _read_limited(response: aiohttp.ClientResponse, host: str, max_bytes: int) -> bytes:
    return b"".join([chunk async for chunk in _limited_chunks(response, host, max_bytes)])


async def _limited_chunks(response: aiohttp.ClientResponse, host: str, max_bytes: int):
    declared = response.content_length
    if declared is not None and declared > max_bytes:
        raise RemoteImageError(f"image_url host {host!r} sends {declared} bytes, more than the {max_bytes} allowed")
    # Content-Length may be absent (chunked) or wrong; the count of what actually arrives is what binds.
    received = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        received += len(chunk)
        if received > max_bytes:
            raise RemoteImageError(f"image_url host {host!r} sent more than the {max_bytes} bytes allowed")
        yield chunk
