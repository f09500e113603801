"""`python -m comfyui_krea serve` -> fal's protocol on aiohttp, over the in-process runner (no ComfyUI needed).

The fal clients point here with FAL_RUN_HOST=HOST:PORT and FAL_QUEUE_RUN_HOST=HOST:PORT/queue (Python, which
speaks only https: give --tls-cert/--tls-key, e.g. from `make-cert`), or with a proxyUrl of HOST:PORT/proxy (JS).

Besides the protocol's own checks (fal_api), the server bounds its connections: at most `max_connections` are open
(more are answered 503 and closed at once), a connection with no request in progress (idle, or still sending its
headers) is closed after IDLE_TIMEOUT_S, and so is a TLS handshake that takes longer. On SIGTERM or Ctrl-C it stops
listening, ends every waiting request as cancelled (recorded, so a client asking later is told), interrupts the
running one before its next block and exits within seconds; the --demo models' temporary folder is removed then,
and one left by a server that was killed (kill -9) is removed when the next one starts.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from ..fal_api.routes import MAX_BODY_BYTES, FalService, add_fal_routes
from ..fal_api.settings import API_KEY_ENV, IDLE_TIMEOUT_S, MAX_CONNECTIONS, ServiceSettings
from ..nodes.host import standalone_host
from .demo import write_demo_models
from .runner_backend import RunnerBackend

log = logging.getLogger(__name__)

DEMO_PREFIX = "krea-serve-demo-"  # + <pid>-<random>: the demo models' temporary folder
STOP_S = 10.0  # on shutdown, how long the running request may take to reach its next block
HANDLERS_STOP_S = 3.0  # then how long open calls (a run waiting for its result, a status stream) may take to end
BACKEND = web.AppKey("backend", Any)  # a RunnerBackend, or ray_jobs.RayBackend


@dataclass(frozen=True)
class ServeOptions:
    output: Path  # result images go to fal/ in it, uploads to fal-uploads/
    models: Path | None = None
    tokenizers: Path | None = None
    model: str | None = None  # the transformer file in models/diffusion_models (None: the workflows' own)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    max_connections: int = MAX_CONNECTIONS
    memory_check: bool = True  # the command line's memory pre-flight before a request is queued
    ray: Any = None  # ray_serve.RayOptions: the requests run on replicas of a Ray cluster (`serve --ray`)


def make_app(options: ServeOptions, service: FalService | None = None) -> tuple[web.Application, FalService]:
    """The aiohttp application with the protocol at its root, over `service` (`serve --ray`) or the in-process
    runner; the backend stops with the app."""
    # Also under --ray: the ingress checks LoRA names and files in the models folder before a request is queued.
    standalone_host().configure(models_dir=options.models, output_dir=options.output,
                                tokenizer_dir=options.tokenizers)
    if service is None:
        backend = RunnerBackend(options.output, options.model, memory_check=options.memory_check)
        service = FalService.create(backend, options.output / "fal-uploads", options.service)
    backend = service.backend
    app = web.Application(client_max_size=MAX_BODY_BYTES + 1024 * 1024)
    add_fal_routes(app.router, service)
    app[BACKEND] = backend

    async def stop_backend(app: web.Application) -> None:
        if not backend.closed:  # `serve` stops it itself, before the connections close
            backend.shutdown()
            await asyncio.get_running_loop().run_in_executor(None, backend.close, STOP_S)

    app.on_cleanup.append(stop_backend)
    return app, service


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a number past any process id
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_demo_folders(root: Path | None = None) -> None:
    """Remove demo folders of this user whose server is gone (killed with SIGKILL, which no cleanup survives)."""
    if os.name != "posix":
        return  # os.kill(pid, 0) is no liveness test there
    for path in (root or Path(tempfile.gettempdir())).glob(DEMO_PREFIX + "*"):
        pid = path.name[len(DEMO_PREFIX):].split("-", 1)[0]
        try:
            owned = path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if owned and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by a demo server that was killed", path)


@contextlib.contextmanager
def demo_models() -> Iterator[tuple[Path, Path]]:
    """Small random-weight models (the images are noise) in a temporary folder removed on exit."""
    remove_stale_demo_folders()
    with tempfile.TemporaryDirectory(prefix=f"{DEMO_PREFIX}{os.getpid()}-") as scratch:
        yield write_demo_models(Path(scratch))


_BUSY_BODY = json.dumps({"detail": "the server has too many open connections; try again shortly",
                         "error_type": "too_many_connections"}).encode()
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _Busy(asyncio.Protocol):
    """A connection over the bound: answered 503 and closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(BUSY_RESPONSE)  # type: ignore[attr-defined]
        transport.close()


def bounded(server: web.Server, limit: int) -> Callable[[], asyncio.BaseProtocol]:
    """aiohttp's protocol factory, but a busy answer for every connection past `limit` open ones."""
    warned = [0.0]

    def protocol() -> asyncio.BaseProtocol:
        if len(server.connections) < limit:
            return server()
        if time.monotonic() - warned[0] > 60:
            warned[0] = time.monotonic()
            log.warning("fal server: %d connections open, the most allowed (--max-connections); new ones get 503",
                        limit)
        return _Busy()

    return protocol


async def _serve(app: web.Application, host_name: str, port: int, tls: ssl.SSLContext | None,
                 max_connections: int, banner: Callable[[], None]) -> bool:
    """Serve until SIGTERM or SIGINT; True when the worker stopped within STOP_S."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C raises KeyboardInterrupt instead
            loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, keepalive_timeout=IDLE_TIMEOUT_S, shutdown_timeout=HANDLERS_STOP_S)
    await runner.setup()
    backend = app[BACKEND]
    try:
        assert runner.server is not None
        listener = await loop.create_server(bounded(runner.server, max_connections), host_name, port, ssl=tls,
                                            ssl_handshake_timeout=IDLE_TIMEOUT_S if tls else None,
                                            reuse_address=True)
        banner()
        try:
            await stop.wait()
        finally:
            listener.close()
            log.info("fal server: stopping")
    finally:
        backend.shutdown()  # waiting requests end cancelled now; their clients' calls can then end too
        stopped = await loop.run_in_executor(None, backend.close, STOP_S)
        await runner.cleanup()
    return stopped


def serve(options: ServeOptions, host_name: str, port: int, tls: ssl.SSLContext | None, demo: bool) -> int:
    """Serve until Ctrl-C or SIGTERM; 0 after a clean stop."""
    with demo_models() if demo else contextlib.nullcontext(None) as made:
        if made is not None:
            options = dataclasses.replace(options, models=made[0], tokenizers=made[1])
        stack = contextlib.ExitStack()
        service = None
        if options.ray is not None:
            from .ray_serve import ray_service

            service = stack.enter_context(ray_service(options.ray, options.service, options.models,
                                                      options.tokenizers, options.output, options.memory_check,
                                                      options.model))
        app, _ = make_app(options, service)
        scheme = "https" if tls else "http"
        shown = f"[{host_name}]" if ":" in host_name else host_name
        key = "set" if options.service.api_key else f"none ({API_KEY_ENV} not set: any key is accepted)"

        def banner() -> None:
            print(f"fal protocol at {scheme}://{shown}:{port}  (API key: {key})\n"
                  f"  Python: FAL_RUN_HOST={shown}:{port} FAL_QUEUE_RUN_HOST={shown}:{port}/queue"
                  + ("" if tls else "  (the Python client needs https: give --tls-cert/--tls-key)") + "\n"
                  f"  JS:     fal.config({{ proxyUrl: {{ url: \"{scheme}://{shown}:{port}/proxy\", "
                  'when: "always" } })', flush=True)

        with stack:
            stopped = asyncio.run(_serve(app, host_name, port, tls, options.max_connections, banner))
    if not stopped:
        # The worker is inside something no check interrupts (a model being read); letting the interpreter tear
        # torch down under it aborts the process, so it ends here, its temporary folder already removed.
        log.warning("fal server: the running request did not stop within %g s; exiting without it", STOP_S)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143)
    return 0
