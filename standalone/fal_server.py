"""`python -m comfyui_krea serve` -> fal's protocol on aiohttp, over the in-process runner (no ComfyUI needed).

The fal clients point here with FAL_RUN_HOST=HOST:PORT and FAL_QUEUE_RUN_HOST=HOST:PORT/queue (Python, which
speaks only https: give --tls-cert/--tls-key, e.g. from `make-cert`), or with a proxyUrl of HOST:PORT/proxy (JS).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..nodes import host
from .jobs import JobStore
from .routes import API_KEY_ENV, MAX_BODY_BYTES, FalService, add_fal_routes
from .runner_backend import RunnerBackend
from .storage import Uploads

log = logging.getLogger(__name__)

RETENTION_HOURS = 24.0
MAX_QUEUE = 32


@dataclass(frozen=True)
class ServeOptions:
    output: Path
    models: Path | None = None
    tokenizers: Path | None = None
    retention_hours: float = RETENTION_HOURS
    max_queue: int = MAX_QUEUE
    allow_remote_images: bool = False
    api_key: str | None = None


def make_app(options: ServeOptions) -> tuple[web.Application, FalService]:
    """The aiohttp application with the protocol at its root; the backend's thread stops with the app."""
    host.configure_standalone(models_dir=options.models, output_dir=options.output,
                              tokenizer_dir=options.tokenizers)
    retention_s = options.retention_hours * 3600
    uploads = Uploads(options.output / "fal-uploads", retention_s)
    uploads.prepare()
    backend = RunnerBackend(options.output)
    service = FalService(backend=backend, uploads=uploads, jobs=JobStore(retention_s, options.max_queue),
                         api_key=options.api_key, allow_remote_images=options.allow_remote_images)
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
    from ..standalone.demo import write_demo_models

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
        key = "set" if options.api_key else f"none ({API_KEY_ENV} not set: any key is accepted)"
        print(f"fal protocol at {scheme}://{shown}:{port}  (API key: {key})\n"
              f"  Python: FAL_RUN_HOST={shown}:{port} FAL_QUEUE_RUN_HOST={shown}:{port}/queue"
              + ("" if tls else "  (the Python client needs https: give --tls-cert/--tls-key)") + "\n"
              f"  JS:     proxyUrl {scheme}://{shown}:{port}/proxy", flush=True)
        web.run_app(app, host=host_name, port=port, ssl_context=tls, print=None, handle_signals=True)


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None
