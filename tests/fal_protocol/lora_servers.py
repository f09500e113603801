"""The servers of the LoRA endpoint tests (tests/test_fal_lora_endpoints.py): `serve` over a models folder and the
real ComfyUI, each with a transformer of unequal depths, LoRA files of two formats and hostile ones in its loras
folder, remote LoRAs allowed and LoRA URLs of loras.example led to `LoraFileServer` (lora_dns); and that file server.
"""
from __future__ import annotations

import contextlib
import dataclasses
import http.server
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from comfyui_krea.model_loader.flux import FluxConfig, config_from_checkpoint, write_random_flux_checkpoint
from comfyui_krea.standalone.certificates import make_certificates
from fal_protocol.servers import API_KEY, PACK, Server, comfyui, free_port, running

HERE = Path(__file__).resolve().parent
GOOD = {"style.safetensors": ("kohya", 1), "sub/detail.safetensors": ("diffusers", 2)}
TOO_LARGE = 10 * 1024**3  # the Content-Length /huge declares


def write_loras(loras: Path, config: FluxConfig) -> None:
    """Two LoRAs of `config` (kohya, diffusers) and the hostile files: a pickle, a truncated header, an SDXL LoRA,
    a FLUX LoRA of other widths."""
    sys.path.insert(0, str(PACK / "tests"))
    from lora_files import write_lora

    for name, (fmt, seed) in GOOD.items():
        write_lora(loras / name, config, fmt, seed=seed)
    write_lora(loras / "wide.safetensors", dataclasses.replace(config, hidden_size=128, num_heads=8), "kohya")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              str(loras / "sdxl.safetensors"))
    (loras / "pickled.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    (loras / "truncated.safetensors").write_bytes((loras / "style.safetensors").read_bytes()[:200])


class LoraFileServer:
    """Serves a folder over http on 127.0.0.1 (reached as loras.example:<port> through lora_dns), counting GETs per
    path; /huge declares a 10 GB body and sends none."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.gets: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.gets[self.path] = server.gets.get(self.path, 0) + 1
                if self.path == "/huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(TOO_LARGE))
                    self.end_headers()
                    return
                path = (server.folder / self.path.lstrip("/")).resolve()
                if not path.is_relative_to(server.folder.resolve()) or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://loras.example:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_models(work: Path) -> tuple[Path, Path, FluxConfig]:
    """The demo's models with a transformer of 2 double and 3 single blocks, and the LoRAs."""
    from comfyui_krea.standalone.demo import write_demo_models

    models, tokenizers = write_demo_models(work)
    base = models / "diffusion_models" / "flux1-krea-dev.safetensors"
    config = dataclasses.replace(config_from_checkpoint(base), depth=2, depth_single_blocks=3)
    write_random_flux_checkpoint(base, config, seed=4)
    write_loras(models / "loras", config)
    return models, tokenizers, config


@contextlib.contextmanager
def lora_serve(work: Path) -> Iterator[tuple[Server, Path, Path]]:
    """`serve --models` with remote LoRAs allowed; (server, models, tokenizers)."""
    models, tokenizers, _ = serve_models(work / "models-root")
    certs = make_certificates(work / "certs")
    port, output = free_port(), work / "output"
    env = {**os.environ, "KREA_FAL_API_KEY": API_KEY, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(HERE / "serve_with_lora_dns.py"), "serve", "--models", str(models),
               "--tokenizers", str(tokenizers), "--port", str(port), "--output", str(output), "--tls-cert",
               str(certs.server_cert), "--tls-key", str(certs.server_key), "--allow-remote-loras",
               "--no-memory-check"]
    log = work / "serve.log"
    with running(command, env, work, f"https://127.0.0.1:{port}/", certs, log):
        yield Server("serve", f"127.0.0.1:{port}", certs, output, output / "fal-uploads", log), models, tokenizers


@contextlib.contextmanager
def lora_comfyui(work: Path, comfyui_dir: str) -> Iterator[Server]:
    """The real ComfyUI with the pack, remote LoRAs allowed, LoRA URLs led to the test's file server."""
    sys.path.insert(0, str(PACK / "tests" / "comfyui_host"))
    from host_models import TINY, write_other_models  # (not scenarios: it imports ComfyUI into this process)

    base = work / "base"
    nodes, models = base / "custom_nodes", base / "models"
    nodes.mkdir(parents=True)
    (nodes / "krea").symlink_to(PACK)
    (nodes / "lora_dns").symlink_to(HERE / "lora_dns")
    config = dataclasses.replace(TINY, depth_single_blocks=3)
    for folder in ("diffusion_models", "text_encoders", "vae", "loras"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    write_random_flux_checkpoint(models / "diffusion_models" / "flux1-krea-dev.safetensors", config, seed=1)
    write_other_models(models, config, "t5xxl_fp16.safetensors")
    write_loras(models / "loras", config)
    with comfyui(work, comfyui_dir, extra_env={"KREA_FAL_REMOTE_LORAS": "1"}) as server:
        yield server
