"""Hosts and addresses of an image_url -> the public IP addresses it may be fetched from, or why not.

A fetch of another host's URL turns this server into a proxy for whoever sends the request, so every hop is
checked after DNS resolution: a name that resolves to loopback, a private network, link-local (cloud metadata at
169.254.169.254), or anything else that is not publicly routable is refused before a connection is opened.
IPv6 forms that carry an IPv4 address are judged by that address, and the legacy IPv4 spellings (2130706433,
0x7f.1, 127.1) by the address they denote. remote_fetch.py does the fetching over the addresses checked here.
"""
from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable

from yarl import URL


class RemoteImageError(ValueError):
    """An image_url that was refused or could not be fetched; the message says what and why."""


Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the IP addresses the host resolves to, as strings; raises OSError when it cannot resolve."""

SCHEMES = {"http": 80, "https": 443}  # what may be fetched, and the default port of each
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud providers' instance-metadata endpoints. The generic checks refuse them already (link-local, ULA, CGNAT);
# naming them makes the refusal say what the request was most likely after.
_CLOUD_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23",
              "100.100.100.200")
)

# Ranges refused whatever the Python version: the stdlib's is_global/is_private tables changed in 3.12.4/3.13,
# and an older interpreter must not let these through.
_ALSO_REFUSED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("0.0.0.0/8"), "unspecified"),
    (ipaddress.ip_network("100.64.0.0/10"), "not globally routable"),  # carrier-grade NAT, shared address space
    (ipaddress.ip_network("192.0.0.0/24"), "reserved"),
    (ipaddress.ip_network("198.18.0.0/15"), "reserved"),  # benchmarking
    (ipaddress.ip_network("240.0.0.0/4"), "reserved"),
    (ipaddress.ip_network("::/96"), "reserved"),  # IPv4-compatible (deprecated) and :: / ::1 neighbours
    (ipaddress.ip_network("::ffff:0:0:0/96"), "reserved"),  # IPv4-translated (SIIT)
    (ipaddress.ip_network("64:ff9b:1::/48"), "not globally routable"),  # local-use NAT64 prefix
    (ipaddress.ip_network("100::/64"), "reserved"),  # discard-only
    (ipaddress.ip_network("2001::/23"), "reserved"),  # IETF protocol assignments, teredo among them
    (ipaddress.ip_network("2001:db8::/32"), "reserved"),  # documentation
    (ipaddress.ip_network("3fff::/20"), "reserved"),  # documentation (2024)
    (ipaddress.ip_network("5f00::/16"), "reserved"),  # SRv6 SIDs
    (ipaddress.ip_network("fec0::/10"), "private"),  # site-local (deprecated)
    (ipaddress.ip_network("fc00::/7"), "private"),  # unique local addresses
)
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")


def refused_address(address: str) -> str | None:
    """None when `address` is a public IP address; otherwise why it is refused, in a word or two.

    The word comes first ("loopback", "private", "link-local", "multicast", "reserved", "unspecified",
    "not globally routable"), followed for IPv6 forms that carry an IPv4 address by what they carry, e.g.
    "loopback (6to4 of 127.0.0.1)"; cloud metadata endpoints add "(cloud metadata)".
    """
    # A zone index (fe80::1%eth0) names an interface, not a different address; it changes nothing here.
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    return _refusal(ip)


def _refusal(ip: IPAddress) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address):
        # Forms that a host (or a translator on the path) turns into an IPv4 destination are judged by that
        # destination: ::ffff:127.0.0.1 is loopback however public its IPv6 reading may look.
        for form, v4 in _embedded_ipv4(ip):
            reason = _refusal(v4)
            if reason is not None:
                return f"{reason} ({form} {v4})"
        if ip.ipv4_mapped is not None or ip in _NAT64_WELL_KNOWN:
            # These only ever reach their IPv4 address (the stdlib files both under reserved ::/8), so a public
            # one is public: a DNS64 network or a resolver that maps to IPv6 must still be able to fetch.
            return None
    word = _plain_refusal(ip)
    if word is not None and ip in _CLOUD_METADATA:
        return f"{word} (cloud metadata)"
    return word


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    embedded: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        embedded.append(("IPv4-mapped", ip.ipv4_mapped))
    if ip.sixtofour is not None:
        embedded.append(("6to4 of", ip.sixtofour))
    if ip.teredo is not None:
        embedded.append(("teredo client", ip.teredo[1]))
    if ip in _NAT64_WELL_KNOWN:
        embedded.append(("NAT64 of", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    return embedded


def _plain_refusal(ip: IPAddress) -> str | None:
    # The specific words first: "loopback" tells the operator more than "private", which also covers it.
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    for network, word in _ALSO_REFUSED:
        if ip.version == network.version and ip in network:
            return word
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """Every IPv4 and IPv6 address the system resolver gives for `host`, in its order, without repeats."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _type, _proto, _canonname, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = str(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
    return addresses


# A host whose last label is a number is an IPv4 address in one of the legacy forms that inet_aton and the URL
# standard accept (2130706433, 0x7f.1, 017700000001, 127.1), not a DNS name.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a numeric host denotes; None when the host is a name; RemoteImageError when malformed."""
    labels = host.rstrip(".").split(".")
    if not labels or not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    numbers: list[int] = []
    try:
        if len(labels) > 4:
            raise ValueError("more than four parts")
        for label in labels:
            if not _NUMERIC_LABEL.fullmatch(label):
                raise ValueError(f"part {label!r} is not a number")
            if label[:2].lower() == "0x":
                numbers.append(int(label[2:] or "0", 16))
            elif len(label) > 1 and label.startswith("0"):
                numbers.append(int(label, 8))
            else:
                numbers.append(int(label, 10))
        *leading, last = numbers
        if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
            raise ValueError("a part is out of range")
    except ValueError as exc:
        raise RemoteImageError(f"image_url host {host!r} looks like an IPv4 address but is not a valid one "
                               f"({exc}); only public addresses may be fetched") from None
    value = last
    for index, n in enumerate(leading):
        value += n << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def checked_url(url: URL) -> tuple[str, int]:
    """(host, port) of a URL that may be requested at all; RemoteImageError for anything else."""
    # The query may hold a signature or token, and a data: URL a whole image; neither belongs in a message.
    shown = str(url.with_query(None).with_fragment(None)) if url.is_absolute() else str(url)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    if url.scheme not in SCHEMES:
        scheme = repr(url.scheme) if url.scheme else "no scheme"
        raise RemoteImageError(f"image_url {shown!r} has {scheme}; only http and https URLs may be fetched")
    if url.raw_user is not None or url.raw_password is not None:
        # Credentials in the URL would be sent to whatever host a redirect names; nothing legitimate needs them.
        raise RemoteImageError(f"image_url of host {url.raw_host!r} carries user credentials; they are not allowed")
    host = url.raw_host
    if not host:
        raise RemoteImageError(f"image_url {shown!r} names no host")
    port = url.port if url.port is not None else SCHEMES[url.scheme]
    if not 0 < port < 65536:
        raise RemoteImageError(f"image_url host {host!r} has port {port}, which cannot be connected to")
    return host, port


def _literal_address(host: str) -> str | None:
    """The address an IP-literal host denotes (aiohttp connects to it without a resolver), else None."""
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host.split("%", 1)[0]))
        except ValueError:
            raise RemoteImageError(f"image_url host {host!r} is not a valid IPv6 address") from None
    legacy = _legacy_ipv4(host)
    if legacy is None:
        return None
    if host != str(legacy):
        reason = refused_address(str(legacy))
        if reason is not None:
            raise RemoteImageError(f"image_url host {host!r} is the IPv4 address {legacy}, a {reason} address; "
                                   "only public addresses may be fetched")
        # aiohttp rejects some of these forms and resolvers read others differently; one spelling only.
        raise RemoteImageError(f"image_url host {host!r} is a legacy spelling of the IPv4 address {legacy}; "
                               f"write it as {legacy}")
    return str(legacy)


async def checked_addresses(host: str, port: int, resolver: Resolver) -> list[str]:
    """The addresses `host` may be connected to, all public; RemoteImageError when there are none or any is not."""
    literal = _literal_address(host)
    if literal is not None:
        reason = refused_address(literal)
        if reason is not None:
            raise RemoteImageError(f"image_url host {host!r} is {literal}, a {reason} address; "
                                   "only public addresses may be fetched")
        return [literal]
    try:
        addresses = await resolver(host, port)
    except (OSError, UnicodeError) as exc:  # UnicodeError: a label IDNA cannot encode (empty, over 63 characters)
        raise RemoteImageError(f"image_url host {host[:100]!r} could not be resolved: {exc}") from exc
    if not addresses:
        raise RemoteImageError(f"image_url host {host!r} resolves to no address")
    # One refused address refuses the host: the connector may try any of them, in any order.
    for address in addresses:
        reason = refused_address(address)
        if reason is not None:
            what = "which is not an IP address" if reason == "not an IP address" else f"a {reason} address"
            raise RemoteImageError(f"image_url host {host!r} resolves to {address}, {what}; "
                                   "only public addresses may be fetched")
    return list(addresses)
