"""The two servers of fal's protocol the client tests run against, each in its own process over TLS:
`python -m comfyui_krea serve --demo` and the real ComfyUI (../shared/comfyui) with the pack in custom_nodes.
"""
from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from comfyui_krea.standalone.certificates import Certificates, certificate_paths, make_certificates

PACK = Path(__file__).resolve().parent.parent.parent
API_KEY = "test-key"


@dataclass(frozen=True)
class Server:
    name: str
    address: str  # host:port[/prefix], what FAL_RUN_HOST takes
    certs: Certificates
    output: Path  # where result images go
    uploads: Path  # the server's uploads folder
    log: Path

    @property
    def url(self) -> str:
        return f"https://{self.address}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, ca: Path | None, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(url, context=context, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the server did not answer within {timeout_s} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def running(command: list[str], env: dict, cwd: Path | None, probe: str, certs: Certificates | None,
            log_path: Path) -> Iterator[subprocess.Popen]:
    """The server process until the block ends, once `probe` answers (https with `certs`' CA, else http)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(probe, certs.ca_cert if certs is not None else None, process, log_path)
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def serve_demo(work: Path, extra_args: tuple[str, ...] = ()) -> Iterator[Server]:
    """`python -m comfyui_krea serve --demo` over TLS with an API key, on a free port; started again over the same
    folders when `work` was used before (a restart)."""
    certs = certificate_paths(work / "certs") if (work / "certs").exists() else make_certificates(work / "certs")
    port, output = free_port(), work / "output"
    env = {**os.environ, "KREA_FAL_API_KEY": API_KEY, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "comfyui_krea", "serve", "--demo", "--port", str(port), "--output", str(output),
               "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--max-queue", "8",
               *extra_args]
    log = work / "serve.log"
    with running(command, env, work, f"https://127.0.0.1:{port}/", certs, log):
        yield Server("serve", f"127.0.0.1:{port}", certs, output, output / "fal-uploads", log)


def write_comfyui_models(models: Path) -> None:
    """Small models under the shipped workflows' file names, text encoders with the real vocabularies (ComfyUI
    tokenizes with its own tokenizer files)."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]);"
            "from scenarios import TINY, write_other_models;"
            "from comfyui_krea.model_loader.flux import write_random_flux_checkpoint;"
            "m = Path(sys.argv[1]);"
            "[(m / f).mkdir(parents=True, exist_ok=True) for f in ('diffusion_models', 'text_encoders', 'vae')];"
            "write_random_flux_checkpoint(m / 'diffusion_models' / 'flux1-krea-dev.safetensors', TINY, seed=1);"
            "write_other_models(m, TINY, 't5xxl_fp16.safetensors')")
    subprocess.run([sys.executable, "-c", code, str(models), str(PACK / "tests" / "comfyui_host")], check=True,
                   timeout=600, env=os.environ.copy())


@contextlib.contextmanager
def comfyui(work: Path, comfyui_dir: str, extra_env: dict[str, str] | None = None) -> Iterator[Server]:
    """The real ComfyUI, --cpu, with --tls-keyfile/--tls-certfile, the pack in custom_nodes, fal under /fal; started
    again over the same folders when `work` was used before (a restart)."""
    certs = certificate_paths(work / "certs") if (work / "certs").exists() else make_certificates(work / "certs")
    base = work / "base"
    if not (base / "custom_nodes").exists():
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / "krea").symlink_to(PACK)
        write_comfyui_models(base / "models")
    port = free_port()
    env = {**os.environ, "KREA_FAL_API_KEY": API_KEY, "PYTHONDONTWRITEBYTECODE": "1", **(extra_env or {})}
    command = [sys.executable, str(Path(comfyui_dir) / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
               str(port), "--base-directory", str(base), "--tls-keyfile", str(certs.server_key), "--tls-certfile",
               str(certs.server_cert), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    log = work / "comfyui.log"
    with running(command, env, Path(comfyui_dir), f"https://127.0.0.1:{port}/system_stats", certs, log):
        yield Server("comfyui", f"127.0.0.1:{port}/fal", certs, base / "output", base / "input" / "fal-uploads", log)


def run_python_client(server: Server, work: Path, key: str = API_KEY) -> dict:
    """The client script's report against `server`."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FAL_KEY": key, "SSL_CERT_FILE": str(server.certs.ca_cert),
           "FAL_HOME_DIR": str(work)}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("python_client.py")), server.address,
                           str(work)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def ok(report: dict, name: str):
    """What a client scenario returned; fails with what it raised, its requests and the server's log."""
    import json

    entry = report[name]
    assert "ok" in entry, f"{name}: {json.dumps(entry.get('error'), indent=1)}\n{entry.get('trace', '')}\n" \
                          f"requests: {json.dumps(entry.get('requests'), indent=1)}\n" \
                          f"{report['_server'].log.read_text()[-3000:]}"
    return entry["ok"]


def failed(report: dict, name: str) -> dict:
    """What a client scenario raised (it must have raised)."""
    entry = report[name]
    assert "error" in entry, f"{name} should have failed, returned {entry.get('ok')}"
    return entry["error"]
