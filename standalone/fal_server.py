"""`python -m comfyui_krea serve` -> fal's protocol on aiohttp, over the in-process runner (no ComfyUI needed).

The fal clients point here with FAL_RUN_HOST=HOST:PORT and FAL_QUEUE_RUN_HOST=HOST:PORT/queue (Python, which
speaks only https: give --tls-cert/--tls-key, e.g. from `make-cert`), or with a proxyUrl of HOST:PORT/proxy (JS).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..fal_api.routes import MAX_BODY_BYTES, FalService, add_fal_routes
from ..fal_api.settings import API_KEY_ENV, ServiceSettings
from ..nodes.host import standalone_host
from .demo import write_demo_models
from .runner_backend import RunnerBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    output: Path  # result images go to fal/ in it, uploads to fal-uploads/
    models: Path | None = None
    tokenizers: Path | None = None
    model: str | None = None  # the transformer file in models/diffusion_models (None: the workflows' own)
    service: ServiceSettings = field(default_factory=ServiceSettings)


def make_app(options: ServeOptions) -> tuple[web.Application, FalService]:
    """The aiohttp application with the protocol at its root; the backend's thread stops with the app."""
    standalone_host().configure(models_dir=options.models, output_dir=options.output,
                                tokenizer_dir=options.tokenizers)
    backend = RunnerBackend(options.output, options.model)
    service = FalService.create(backend, options.output / "fal-uploads", options.service)
    app = web.Application(client_max_size=MAX_BODY_BYTES + 1024 * 1024)
    add_fal_routes(app.router, service)

    async def stop_backend(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, backend.close)

    app.on_cleanup.append(stop_backend)
    return app, service


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@contextlib.contextmanager
def demo_models() -> Iterator[tuple[Path, Path]]:
    """Small random-weight models (the images are noise) in a temporary folder removed on exit."""
    with tempfile.TemporaryDirectory(prefix="krea-serve-demo-") as scratch:
        yield write_demo_models(Path(scratch))


def serve(options: ServeOptions, host_name: str, port: int, tls: ssl.SSLContext | None, demo: bool) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    with demo_models() if demo else contextlib.nullcontext(None) as made:
        if made is not None:
            options = dataclasses.replace(options, models=made[0], tokenizers=made[1])
        app, _ = make_app(options)
        scheme = "https" if tls else "http"
        shown = f"[{host_name}]" if ":" in host_name else host_name
        key = "set" if options.service.api_key else f"none ({API_KEY_ENV} not set: any key is accepted)"
        print(f"fal protocol at {scheme}://{shown}:{port}  (API key: {key})\n"
              f"  Python: FAL_RUN_HOST={shown}:{port} FAL_QUEUE_RUN_HOST={shown}:{port}/queue"
              + ("" if tls else "  (the Python client needs https: give --tls-cert/--tls-key)") + "\n"
              f"  JS:     proxyUrl {scheme}://{shown}:{port}/proxy", flush=True)
        web.run_app(app, host=host_name, port=port, ssl_context=tls, print=None, handle_signals=True)
