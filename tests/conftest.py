"""What the test modules share: the tiny model configs and random-weight models of them, `rel_err`, stand-ins
(a CUDA runtime, a clock, a file of named zero tensors), and `host_state`, which puts back the host's standalone
settings and the loaded-model cache after a test, with the fixtures built on it.

The configs are the real architectures, reduced until a forward pass takes milliseconds on a CPU; tests write
random-weight checkpoints with them and load those through the real loading code. Test modules import the
constants and helpers with `from conftest import ...` (pytest puts this folder on sys.path); the fixtures need no
import.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from comfyui_krea.model_loader.autoencoder import AutoEncoder, AutoEncoderConfig, write_random_autoencoder_checkpoint
from comfyui_krea.model_loader.flux import FluxConfig, FluxTransformer
from comfyui_krea.model_loader.safety_checker import SafetyCheckerConfig
from comfyui_krea.model_loader.text_encoders import CLIPTextConfig, T5EncoderConfig
from comfyui_krea.nodes.host import StandaloneHost, VaeHandle, forget_loaded, standalone_host

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


# --------------------------------------------------------------------------------------- random-weight models

def random_flux(seed: int = 8) -> FluxTransformer:
    """A TINY_FLUX with random weights (0.2 x normal, seeded), in float32 on the CPU."""
    model = FluxTransformer(TINY_FLUX).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def flux_inputs(config, batch: int = 1, h: int = 3, w: int = 2, txt_len: int = 4) -> dict:
    """forward_orig's keyword inputs for `config`: an h x w grid of image tokens, txt_len text tokens (seeded)."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(img=torch.randn(batch, h * w, config.in_channels, generator=gen),
                img_ids=ids.reshape(1, h * w, 3).expand(batch, -1, -1),
                txt=torch.randn(batch, txt_len, config.context_in_dim, generator=gen),
                txt_ids=torch.zeros(batch, txt_len, 3),
                timesteps=torch.full((batch,), 0.6), y=torch.randn(batch, config.vec_in_dim, generator=gen),
                guidance=torch.full((batch,), 3.5))


def flux_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a FLUX transformer of `config` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in FluxTransformer(config).state_dict().items()}


@pytest.fixture(scope="module")
def tiny_vae() -> AutoEncoder:
    """A TINY_AUTOENCODER with random weights (seed 3), in float32 on the CPU."""
    vae = AutoEncoder(TINY_AUTOENCODER).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return vae


# -------------------------------------------------------------------------------------------------- stand-ins

@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA runtime that answers like a GPU of the given compute capability, on this CPU-only machine."""
    asked = []

    def install(capability=(8, 9), available=True, scaled_mm=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

        def get_device_capability(device=None):
            asked.append(device)
            return capability

        monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
        if not scaled_mm:
            monkeypatch.delattr(torch, "_scaled_mm", raising=False)
        return asked

    return install


def fake_clock(*readings: float) -> SimpleNamespace:
    """A stand-in for a node module's `time`: perf_counter gives these readings, then repeats the last."""
    left = list(readings)
    return SimpleNamespace(perf_counter=lambda: left.pop(0) if len(left) > 1 else left[0])


def zeros_file(path: Path, keys: list[str]) -> Path:
    """A safetensors file of a 2x2 zero tensor under each key: enough for the file identifier, which reads names."""
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


# ------------------------------------------------------------------------------------------- the host's state

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


@pytest.fixture
def output_dir(tmp_path, host_state):
    """The host's output folder, configured to the test's own tmp_path."""
    host_state.configure(output_dir=tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def vae_handle(tmp_path_factory) -> Iterator[VaeHandle]:
    """A VaeHandle on the CPU for a random-weight TINY_AUTOENCODER file (seed 3); the loaded models are forgotten
    after the module's last test."""
    path = write_random_autoencoder_checkpoint(tmp_path_factory.mktemp("vae") / "ae.safetensors", TINY_AUTOENCODER,
                                               seed=3)
    yield VaeHandle(path, torch.device("cpu"))
    forget_loaded()


# ------------------------------------------------------------------------------------- fal's protocol servers

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
