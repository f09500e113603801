"""What the test modules share: the tiny model configs, `rel_err`, and `host_state`, which puts back the host's
standalone settings and the loaded-model cache after a test.

The configs are the real architectures, reduced until a forward pass takes milliseconds on a CPU; tests write
random-weight checkpoints with them and load those through the real loading code. Test modules import the
constants and `rel_err` with `from conftest import ...` (pytest puts this folder on sys.path).
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig
from comfyui_krea.model_loader.flux import FluxConfig
from comfyui_krea.model_loader.safety_checker import SafetyCheckerConfig
from comfyui_krea.model_loader.text_encoders import CLIPTextConfig, T5EncoderConfig
from comfyui_krea.nodes.host import StandaloneHost, forget_loaded, standalone_host

# FLUX.1-dev's shape (64 latent channels in, guidance embedding, both kinds of block) at width 32: 2 heads of
# 16, rotary axes (4, 6, 6) summing to the head width.
TINY_FLUX = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=32,
                       num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6))
# 4 levels (so latents are 1/8 of the image), 2 res blocks, 16 latent channels, widths that split into the
# 32 norm groups the file format implies.
TINY_AUTOENCODER = AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, z_channels=16)
# Reduced sizes, full vocabularies (so the real tokenizers work): 2 heads of 64 for CLIP, 4 of 16 for T5.
TINY_CLIP = CLIPTextConfig(width=128, layers=2, intermediate=256)
TINY_T5 = T5EncoderConfig(d_model=64, d_kv=16, heads=4, d_ff=96, layers=3)
# ViT at the classifier's real input (224 px, 16 px patches), 2 layers of width 32.
TINY_SAFETY_CHECKER = SafetyCheckerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                          patch_size=16, image_size=224)


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference||, computed in float64 so half-precision inputs do not round it."""
    ours, reference = ours.double(), reference.double()
    return ((ours - reference).norm() / reference.norm()).item()


@pytest.fixture
def host_state() -> Iterator[StandaloneHost]:
    """The standalone host, with its settings (folders, progress reporter) and the loaded-model cache put back as
    they were when the test ends: tests configure folders of their own and load models from them."""
    host = standalone_host()
    saved = host.settings()
    forget_loaded()
    yield host
    host.restore(saved)
    forget_loaded()


@pytest.fixture(scope="session")
def fal_server(tmp_path_factory):
    """fal_server("serve" | "comfyui"): that server of fal's protocol (tests/fal_protocol/servers.py), started
    once per session and shared by the Python and JS client tests; "comfyui" skips without COMFYUI_DIR."""
    import contextlib
    import os

    from fal_protocol.servers import comfyui, serve_demo

    started: dict = {}
    with contextlib.ExitStack() as stack:
        def get(name: str):
            if name not in started:
                work = tmp_path_factory.mktemp(f"fal-{name}")
                if name == "comfyui":
                    if not os.environ.get("COMFYUI_DIR"):
                        pytest.skip("the ComfyUI routes need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set "
                                    "COMFYUI_DIR (CI does)")
                    started[name] = stack.enter_context(comfyui(work, os.environ["COMFYUI_DIR"]))
                else:
                    started[name] = stack.enter_context(serve_demo(work))
            return started[name]

        yield get
