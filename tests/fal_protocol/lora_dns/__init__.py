"""Loaded into a fal server process by the LoRA endpoint tests (tests/test_fal_lora_endpoints.py): LoRA URLs of
`loras.example` resolve, through a fake resolver, to a public address, which the real address guard approves, and
the pinned connector then connects to 127.0.0.1, where the test's own file server listens. Nothing else changes:
every other name still resolves through DNS and is guarded as usual. Inside ComfyUI this folder is a custom node
(loaded after the pack, whose modules it finds in sys.modules); for `serve`, serve_with_lora_dns.py imports it.
"""
from __future__ import annotations

import socket
import sys

PUBLIC = "93.184.216.34"  # what loras.example "resolves" to; nothing ever connects to it
NODE_CLASS_MAPPINGS: dict = {}


async def _resolve(host: str, port: int) -> list[str]:
    if host != "loras.example":
        raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known: {host}")
    return [PUBLIC]


def patch_now() -> int:
    """Patch every loaded fal_api.remote_fetch; how many."""
    patched = 0
    for name, module in list(sys.modules.items()):
        if name.endswith("fal_api.remote_fetch") and hasattr(module, "fetch_to_file"):
            pinned = module.pinned_connector

            def to_localhost(hosts: dict, pinned=pinned):
                assert all(addresses == [PUBLIC] for addresses in hosts.values()), hosts  # the guard's approval
                return pinned({host: ["127.0.0.1"] for host in hosts})

            module.fetch_to_file.__kwdefaults__.update(resolver=_resolve, connector_factory=to_localhost)
            patched += 1
    return patched


def _patch_when_loaded() -> None:
    """ComfyUI loads custom nodes in the folder's order: wait for the pack's module when it comes later."""
    import threading
    import time

    def wait() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not patch_now():
            time.sleep(0.05)

    threading.Thread(target=wait, daemon=True).start()


if not patch_now():
    _patch_when_loaded()
