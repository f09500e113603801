"""`serve` (standalone/fal_server.py) run in the test's own process: `serve_while` runs it until a client thread has
visited it over real sockets and sent this process the signal its event loop stops on, putting the signal
handlers back after; with plain HTTP helpers (`call`, `status_of`) and socket ones (`read_all`, `held`).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from comfyui_krea.standalone import fal_server
from comfyui_krea.standalone.fal_server import ServeOptions
from fal_protocol.servers import free_port

T2I = "fal-ai/flux/krea"
SMALL = {"image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}
LONG = {"image_size": {"width": 1024, "height": 1024}, "num_inference_steps": 50}


def leave(code: int) -> None:
    """Stands in for os._exit: raises SystemExit(code) instead of ending pytest."""
    raise SystemExit(code)


def call(base: str, path: str, body: dict | None = None, headers: dict | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/{path}", method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def serve_while(visit: Callable[[int], object], options: ServeOptions, host: str = "127.0.0.1",
                tls: ssl.SSLContext | None = None, demo: bool = False, signum: int = signal.SIGTERM,
                port: int | None = None) -> tuple[int, object, float]:
    """Run `serve` here until `visit(port)`, run by a client thread once the port takes connections, has returned
    and `signum` reached this process: (serve's exit code, what visit returned, seconds from the signal to the
    return). Whatever visit raised is raised here; when the port takes no connection in time (20 s, a minute with
    `demo`, whose models are written first), the signal is sent all the same."""
    port = port or free_port()
    done = threading.Event()
    outcome: dict = {}
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}

    def client() -> None:
        try:
            deadline = time.monotonic() + (60 if demo else 20)
            while not done.is_set():
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            else:
                return
            time.sleep(0.05)  # the server sees the probe's connection close
            outcome["value"] = visit(port)
        except BaseException as err:  # noqa: BLE001 - raised again in the test's thread
            outcome["error"] = err
        finally:
            if not done.is_set():
                outcome["signalled"] = time.monotonic()
                os.kill(os.getpid(), signum)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        code = fal_server.serve(options, host, port, tls, demo)
    finally:
        returned = time.monotonic()
        signal.signal(signal.SIGTERM, lambda *_: None)  # the loop left SIG_DFL: no late signal may end pytest
        done.set()
        thread.join(30)
        for number, handler in previous.items():
            signal.signal(number, handler)
    if "error" in outcome:
        raise outcome["error"]
    return code, outcome.get("value"), returned - outcome.get("signalled", returned)


def options_for(demo: tuple[Path, Path], output: Path, **changes) -> ServeOptions:
    return ServeOptions(output=output, models=demo[0], tokenizers=demo[1], **changes)


def status_of(base: str, request_id: str) -> dict:
    return call(base, f"queue/fal-ai/flux/requests/{request_id}/status")[1]


def read_all(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """What the server sends on `sock` within `seconds`, and whether it closed the connection by then."""
    sock.settimeout(0.05)
    deadline, got = time.monotonic() + seconds, b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return got, True
        if not chunk:
            return got, True
        got += chunk
    return got, False


def held(port: int) -> socket.socket:
    """A keep-alive connection the server took (answered 404 to a request), kept open; it retries while the
    server still counts a connection just closed (the probe's) against the bound."""
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        if answer.startswith(b"HTTP/1.1 404 "):
            return sock
        sock.close()
        time.sleep(0.05)
    raise AssertionError(f"the server took no connection: {answer!r}")
