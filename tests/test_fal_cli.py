"""`python -m comfyui_krea make-cert` and `serve` on the command line: what they print, what they refuse."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("cryptography", reason="make-cert needs cryptography: pip install -e '.[serve]'")


def krea(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "comfyui_krea", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_make_cert_prints_the_settings_and_never_overwrites(tmp_path):
    done = krea("make-cert", str(tmp_path / "certs"), "--port", "8188", "--prefix", "/fal")
    assert done.returncode == 0, done.stderr
    assert "FAL_RUN_HOST=127.0.0.1:8188/fal" in done.stdout and "FAL_QUEUE_RUN_HOST=127.0.0.1:8188/fal/queue" in \
        done.stdout
    assert f"SSL_CERT_FILE={tmp_path / 'certs' / 'ca.pem'}" in done.stdout
    before = {p.name: p.read_bytes() for p in (tmp_path / "certs").iterdir()}
    assert set(before) == {"ca.pem", "server.pem", "server-key.pem"}
    again = krea("make-cert", str(tmp_path / "certs"))
    assert again.returncode == 2 and "error:" in again.stderr and "exists" in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "certs").iterdir()} == before


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--demo", "--models", "m"], "--demo builds its own models"),
])
def test_serve_refuses_bad_options_before_starting(args, message):
    done = krea("serve", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_serve_prints_the_settings_each_client_honours(tmp_path):
    """The JS client honours a proxyUrl string only in browsers; Node needs {url, when: "always"}."""
    pytest.importorskip("aiohttp", reason="serve needs aiohttp: pip install -e '.[serve]'")
    from fal_protocol.servers import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "comfyui_krea", "serve", "--demo", "--port", str(port),
                               "--output", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        lines = [server.stdout.readline().strip() for _ in range(3)]
    finally:
        server.terminate()
        server.communicate(timeout=60)
    assert lines[0].startswith(f"fal protocol at http://127.0.0.1:{port}"), lines
    assert lines[1].startswith(f"Python: FAL_RUN_HOST=127.0.0.1:{port} FAL_QUEUE_RUN_HOST=127.0.0.1:{port}/queue")
    assert lines[2] == f'JS:     fal.config({{ proxyUrl: {{ url: "http://127.0.0.1:{port}/proxy", when: "always" }} }})'
