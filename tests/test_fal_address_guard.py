"""fal_api.remote_fetch's address guard: an image_url is fetched only from public addresses. `refused_address`
names why an address is refused (IPv4-mapped, 6to4, NAT64 and cloud metadata addresses seen through), and a URL is
refused before any connection when its scheme, credentials, port or host do not pass, its name resolves to any
non-public address (or to nothing, or not in time), or its IP literal (in any legacy spelling) is not public.

No test here connects anywhere: refusals run with a connector factory that fails the test if it is ever called,
and approved URLs with one that records what it was asked to pin and stops the fetch.
"""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from comfyui_krea.fal_api.address_guard import checked_addresses
from comfyui_krea.fal_api.remote_fetch import (
    FetchLimits,
    RemoteImageError,
    Resolver,
    fetch_image_bytes,
    refused_address,
)
from fake_dns import PUBLIC, fake_resolver


async def must_not_resolve(host: str, port: int) -> list[str]:
    raise AssertionError(f"must not resolve {host!r}: an IP literal is checked as it is")


class MustNotConnect:
    """A connector factory that fails the test when called, and remembers that it was."""

    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []

    def __call__(self, pinned: dict[str, list[str]]) -> aiohttp.BaseConnector:
        self.calls.append(pinned)
        raise AssertionError(f"must not connect: {pinned}")


class StopBeforeConnecting(Exception):
    """Raised by RecordOnly, so that an approved fetch ends before it opens a connection."""


class RecordOnly:
    """A connector factory that records what it was asked to pin and then stops the fetch."""

    def __init__(self) -> None:
        self.calls: list[dict[str, list[str]]] = []

    def __call__(self, pinned: dict[str, list[str]]) -> aiohttp.BaseConnector:
        self.calls.append(pinned)
        raise StopBeforeConnecting


def refused(url: str, resolver: Resolver, **kwargs: object) -> str:
    """The message of the RemoteImageError that fetching `url` raises, checking no connection was attempted."""
    factory = MustNotConnect()
    with pytest.raises(RemoteImageError) as caught:
        asyncio.run(fetch_image_bytes(url, resolver=resolver, connector_factory=factory, **kwargs))  # type: ignore[arg-type]
    assert factory.calls == []
    return str(caught.value)


# --- refused_address ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "word"), [
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("169.254.1.1", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "unspecified"),
    ("100.64.0.1", "not globally routable"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", None),  # refused; the word depends on the Python version's tables
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fd00:ec2::254", "private"),
    ("ff02::1", "multicast"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "link-local"),
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
    ("2001:db8::1", None),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", None),  # teredo
    ("fec0::1", None),  # site-local
])
def test_refused_address_names_why(address: str, word: str | None) -> None:
    reason = refused_address(address)
    assert reason is not None, address
    if word is not None:
        assert reason.startswith(word), (address, reason)


def test_refused_address_says_what_an_embedded_or_metadata_address_is() -> None:
    assert refused_address("::ffff:127.0.0.1") == "loopback (IPv4-mapped 127.0.0.1)"
    assert refused_address("2002:7f00:1::") == "loopback (6to4 of 127.0.0.1)"
    assert refused_address("64:ff9b::a00:1") == "private (NAT64 of 10.0.0.1)"
    assert refused_address("169.254.169.254") == "link-local (cloud metadata)"
    assert refused_address("fd00:ec2::254") == "private (cloud metadata)"
    # Teredo keeps its client's IPv4 address inverted in the last 32 bits: here 10.0.0.1.
    assert refused_address("2001:0:4136:e378:8000:63bf:f5ff:fffe") == "private (teredo client 10.0.0.1)"


@pytest.mark.parametrize("zone", ["%eth0", "%1", "%eth0%1"])
def test_a_zone_index_changes_nothing(zone: str) -> None:
    # getaddrinfo gives link-local answers with their interface; the address is the same one.
    assert refused_address("fe80::1" + zone) == "link-local"
    assert refused_address("fd00:ec2::254" + zone) == "private (cloud metadata)"


@pytest.mark.parametrize("address", ["4000::1", "8000::1", "fe00::1"])
def test_unassigned_ipv6_ranges_are_refused_as_reserved(address: str) -> None:
    assert refused_address(address) == "reserved"


@pytest.mark.parametrize("address", [
    "8.8.8.8", "1.1.1.1", PUBLIC, "2606:4700:4700::1111", "2001:4860:4860::8888",
    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::",  # IPv6 forms of a public IPv4 address
])
def test_refused_address_passes_public_addresses(address: str) -> None:
    assert refused_address(address) is None


@pytest.mark.parametrize("address", ["", "localhost", "example.com", "1.2.3", "::g", "10.0.0.1/8"])
def test_refused_address_refuses_what_is_not_an_address(address: str) -> None:
    assert refused_address(address) == "not an IP address"


# --- refusals before any connection ------------------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254", "0.0.0.0",
    "::1", "fe80::1", "fc00::1", "fd00:ec2::254", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "2002:7f00:1::",
    "100.64.0.1",
])
def test_a_name_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    message = refused("http://images.example/x.png", fake_resolver({"images.example": [address]}))
    assert f"image_url host 'images.example' resolves to {address}, a " in message
    assert "only public addresses may be fetched" in message


def test_the_message_names_host_address_and_reason() -> None:
    message = refused("https://x.example/a.png", fake_resolver({"x.example": ["10.0.0.5"]}))
    assert message == ("image_url host 'x.example' resolves to 10.0.0.5, a private address; "
                       "only public addresses may be fetched")


@pytest.mark.parametrize("addresses", [[PUBLIC, "10.0.0.5"], ["10.0.0.5", PUBLIC], [PUBLIC, "::1"]])
def test_one_non_public_address_among_public_ones_refuses_the_name(addresses: list[str]) -> None:
    message = refused("http://images.example/x.png", fake_resolver({"images.example": addresses}))
    assert "resolves to" in message and PUBLIC not in message


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1/x.png", "127.0.0.1, a loopback"),
    ("http://127.0.0.1:8188/prompt", "127.0.0.1, a loopback"),
    ("http://[::1]/", "::1, a loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback (IPv4-mapped 127.0.0.1)"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://10.0.0.1/", "private"),
    ("http://0.0.0.0/", "unspecified"),
    # Legacy numeric spellings of IPv4 addresses, which yarl leaves as they are and resolvers read as addresses.
    ("http://2130706433/x.png", "IPv4 address 127.0.0.1, a loopback"),
    ("http://017700000001/", "IPv4 address 127.0.0.1, a loopback"),
    ("http://0x7f.1/", "IPv4 address 127.0.0.1, a loopback"),
    ("http://0x7f000001/", "IPv4 address 127.0.0.1, a loopback"),
    ("http://127.1/", "IPv4 address 127.0.0.1, a loopback"),
    ("http://127.0.0.1./", "IPv4 address 127.0.0.1, a loopback"),
    ("http://10.1/", "IPv4 address 10.0.0.1, a private"),
    ("http://2852039166/", "IPv4 address 169.254.169.254, a link-local"),
    ("http://134744072/", "legacy spelling of the IPv4 address 8.8.8.8"),
    ("http://256.1.1.1/", "not a valid one"),
    ("http://08.1.1.1/", "not a valid one"),
    ("http://1.2.3.4.5/", "not a valid one"),
    ("http://1.2.3.4.0/", "not a valid one (more than four parts)"),
    ("http://0x7f.0x.0x.1/", "IPv4 address 127.0.0.1, a loopback"),  # a bare 0x is 0, as inet_aton reads it
    ("http://4294967296/", "not a valid one"),
])
def test_ip_literal_hosts_are_checked_without_resolving(url: str, says: str) -> None:
    assert says in refused(url, must_not_resolve)


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "ftp://images.example/x.png",
    "data:image/png;base64,iVBORw0KGgo=",
    "gopher://images.example/",
    "javascript:alert(1)",
    "//images.example/x.png",
    "images.example/x.png",
])
def test_only_http_and_https_are_fetched(url: str) -> None:
    assert "only http and https URLs may be fetched" in refused(url, fake_resolver({"images.example": [PUBLIC]}))


@pytest.mark.parametrize(("url", "shown", "scheme"), [
    # The query and fragment may hold a signature or token: never in the message of an absolute URL.
    ("ftp://images.example/x.png?token=secret#frag", "ftp://images.example/x.png", "'ftp'"),
    ("images.example/x.png", "images.example/x.png", "no scheme"),
    # Long URLs (a data: URL may be a whole image) are cut to 80 characters.
    ("ftp://images.example/" + "a" * 59, "ftp://images.example/" + "a" * 59, "'ftp'"),
    ("ftp://images.example/" + "a" * 60, "ftp://images.example/" + "a" * 56 + "...", "'ftp'"),
    ("data:image/png;base64," + "A" * 200, "data:image/png;base64," + "A" * 55 + "...", "'data'"),
])
def test_a_refused_scheme_is_named_with_the_url_shown_short(url: str, shown: str, scheme: str) -> None:
    assert refused(url, fake_resolver({})) == (f"image_url {shown!r} has {scheme}; "
                                                "only http and https URLs may be fetched")


@pytest.mark.parametrize("url", [
    "http://user:pass@images.example/x.png",
    "http://user@images.example/x.png",
    "https://:secret@images.example/x.png",
])
def test_credentials_in_the_url_are_refused(url: str) -> None:
    message = refused(url, fake_resolver({"images.example": [PUBLIC]}))
    assert "carries user credentials" in message and "pass" not in message and "secret" not in message


def test_a_url_without_host_or_with_port_zero_is_refused() -> None:
    resolver = fake_resolver({"images.example": [PUBLIC]})
    assert "names no host" in refused("http:///x.png", resolver)
    assert "port 0" in refused("http://images.example:0/x.png", resolver)
    assert "not a valid URL" in refused("http://images.example:99999/x.png", resolver)


def test_a_name_that_does_not_resolve_is_refused() -> None:
    message = refused("http://nowhere.example/x.png", fake_resolver({}))
    assert "image_url host 'nowhere.example' could not be resolved" in message


def test_a_name_resolving_to_nothing_or_to_garbage_is_refused() -> None:
    assert "resolves to no address" in refused("http://a.example/", fake_resolver({"a.example": []}))
    message = refused("http://a.example/", fake_resolver({"a.example": ["not-an-ip"]}))
    assert "resolves to not-an-ip, which is not an IP address" in message


def test_approved_hosts_reach_the_connector_pinned_to_their_checked_addresses() -> None:
    for url, resolver, pinned in [
        ("https://images.example/x.png", fake_resolver({"images.example": [PUBLIC, "2606:4700:4700::1111"]}),
         {"images.example": [PUBLIC, "2606:4700:4700::1111"]}),
        ("http://8.8.8.8/x.png", must_not_resolve, {"8.8.8.8": ["8.8.8.8"]}),
        ("http://[2606:4700:4700::1111]/x.png", must_not_resolve,
         {"2606:4700:4700::1111": ["2606:4700:4700::1111"]}),
        ("http://1.255.1.1/x.png", must_not_resolve, {"1.255.1.1": ["1.255.1.1"]}),  # 255 is a valid part
        # A zone index (percent-encoded in the URL) is the host's; the checked address is the address alone.
        ("http://[2606:4700:4700::1111%25eth0]/x.png", must_not_resolve,
         {"2606:4700:4700::1111%25eth0": ["2606:4700:4700::1111"]}),
        ("http://[2606:4700:4700::1111%25a%25b]/x.png", must_not_resolve,
         {"2606:4700:4700::1111%25a%25b": ["2606:4700:4700::1111"]}),
    ]:
        factory = RecordOnly()
        with pytest.raises(StopBeforeConnecting):
            asyncio.run(fetch_image_bytes(url, resolver=resolver, connector_factory=factory))
        assert factory.calls == [pinned]


def test_the_resolver_is_asked_for_the_host_and_the_default_or_given_port() -> None:
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return [PUBLIC]

    for url in ["http://images.example/x", "https://images.example/x", "http://images.example:8080/x",
                "http://images.example:1/x", "http://images.example:65535/x"]:
        with pytest.raises(StopBeforeConnecting):
            asyncio.run(fetch_image_bytes(url, resolver=resolver, connector_factory=RecordOnly()))
    assert asked == [("images.example", 80), ("images.example", 443), ("images.example", 8080),
                     ("images.example", 1), ("images.example", 65535)]


def test_a_name_ending_in_letters_after_digits_is_a_name() -> None:
    # Only a last label that is all number makes the host an IPv4 address; 10.0.0.1X is a DNS name.
    asked: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return [PUBLIC]

    assert asyncio.run(checked_addresses("10.0.0.1X", 80, resolver)) == [PUBLIC]
    assert asked == ["10.0.0.1X"]


def test_a_slow_resolver_times_out() -> None:
    async def slow_resolver(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return [PUBLIC]

    message = refused("http://images.example/x.png", slow_resolver, limits=FetchLimits(timeout_s=0.2))
    assert "timed out after 0.2 s" in message
