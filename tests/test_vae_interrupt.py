"""Cancel inside the autoencoder: the interrupt check runs before every block of every tile, so a large encode or
decode stops within one block (not one tile, not one pass), and leaves the model as it was."""
from __future__ import annotations

import threading

import pytest
import torch

from comfyui_krea.model_loader.autoencoder.model import ResnetBlock
from comfyui_krea.nodes.host import Interrupted
from comfyui_krea.nodes.image import KreaDecode, KreaEncodeImage


class Cancel(Exception):
    pass


def cancel_after(calls: int):
    seen = []

    def check() -> None:
        seen.append(1)
        if len(seen) >= calls:
            raise Cancel

    return check, seen


@pytest.mark.parametrize("kind", ["encode", "decode"])
def test_the_check_runs_inside_every_tile_and_stops_the_pass(tiny_vae, kind):
    images = torch.rand(1, 3, 48, 48) * 2 - 1
    latents = torch.randn(1, 16, 6, 6)
    run = (lambda **kw: tiny_vae.encode(images, tile_size=32, tile_overlap=8, **kw)) if kind == "encode" else \
        (lambda **kw: tiny_vae.decode(latents, tile_size=32, tile_overlap=8, **kw))
    tiles = []
    reference = run(callback=lambda done, total: tiles.append(done))
    check, seen = cancel_after(10**9)
    assert torch.equal(run(interrupt=check), reference)  # checks only: the result is bit for bit the same
    per_tile = len(seen) / len(tiles)
    assert len(tiles) > 1 and per_tile >= 5, (len(seen), len(tiles))  # every block, not once per tile
    check, seen = cancel_after(3)  # a cancel arriving in the first tile
    finished = []
    with pytest.raises(Cancel):
        run(interrupt=check, callback=lambda done, total: finished.append(done))
    assert finished == [] and len(seen) == 3
    assert torch.equal(run(), reference)  # the checks are gone afterwards


def test_the_nodes_stop_on_the_hosts_cancel_within_a_pass(vae_handle, host_state):
    event = threading.Event()
    host_state.configure(interrupt=event)
    model = vae_handle.load()
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    hook = blocks[0].register_forward_pre_hook(lambda module, args: event.set())  # Cancel pressed mid-pass
    try:
        with pytest.raises(Interrupted):
            KreaEncodeImage().encode(vae_handle, torch.rand(1, 64, 64, 3))
        first_decoder_block = next(m for m in model.decoder.modules() if isinstance(m, ResnetBlock))
        hook.remove()
        hook = first_decoder_block.register_forward_pre_hook(lambda module, args: event.set())
        with pytest.raises(Interrupted):
            KreaDecode().decode(vae_handle, {"samples": torch.randn(1, 16, 8, 8)})
    finally:
        hook.remove()
