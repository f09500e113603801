"""A resolver answering from a table, and the public address it hands out, for the remote-fetch tests
(tests/test_fal_address_guard.py, tests/test_fal_remote_fetch.py): nothing ever connects to that address."""
from __future__ import annotations

import socket

from comfyui_krea.fal_api.remote_fetch import Resolver

PUBLIC = "93.184.216.34"  # a public address the fake resolver hands out; nothing ever connects to it


def fake_resolver(table: dict[str, list[str]]) -> Resolver:
    """A resolver answering from `table`; unknown names fail as getaddrinfo does."""

    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known: {host}")
        return list(table[host])

    return resolve
