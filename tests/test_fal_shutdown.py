"""Starting and stopping the fal servers: `serve` on SIGTERM with requests waiting (cancelled and recorded, the running
one interrupted, a quick clean exit, --demo's folder removed, even after kill -9 at the next start), its refusal of a
TLS key others can read and its memory pre-flight, and both servers answering after a restart for what they finished
before (the ComfyUI half needs COMFYUI_DIR).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.servers import API_KEY, comfyui, free_port, wait_ready  # noqa: E402

from comfyui_krea.standalone.certificates import make_certificates  # noqa: E402
from comfyui_krea.standalone.fal_server import DEMO_PREFIX  # noqa: E402

T2I = "fal-ai/flux/krea"
SMALL = {"image_size": {"width": 64, "height": 48}, "num_inference_steps": 2}
LONG = {"image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}


def demo_folders(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{DEMO_PREFIX}{pid}-*"))


@contextlib.contextmanager
def serve(work: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`serve --demo` over http on a free port, output in work/output; (process, base URL). Killed at the end if
    it is still running."""
    port = free_port()
    log = (work / f"serve-{port}.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "comfyui_krea", "serve", "--demo", "--port", str(port),
                                "--output", str(work / "output"), *args], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        wait_ready(f"http://127.0.0.1:{port}/", None, process, Path(log.name))
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_sigterm_cancels_the_queue_records_it_and_exits_cleanly(tmp_path):
    with serve(tmp_path) as (process, base):
        status, done = call(f"{base}/{T2I}", "POST", {"prompt": "made before", **SMALL})
        assert status == 200, done
        ids = [call(f"{base}/queue/{T2I}", "POST", {"prompt": "x", **LONG})[1]["request_id"] for _ in range(4)]
        for _ in range(600):  # until the first one runs
            if call(f"{base}/queue/fal-ai/flux/requests/{ids[0]}/status")[1]["status"] == "IN_PROGRESS":
                break
            time.sleep(0.1)
        assert demo_folders(process.pid)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = process.wait(timeout=30)
        took = time.monotonic() - started
        pid = process.pid
    assert code in (0, 143) and took < 15, (code, took)
    assert demo_folders(pid) == []
    with serve(tmp_path) as (_, base):  # a restart over the same output folder
        states = [call(f"{base}/queue/fal-ai/flux/requests/{request_id}/status")[1] for request_id in ids]
        assert [state["status"] for state in states] == ["COMPLETED"] * 4
        assert {state["error_type"] for state in states} == {"request_cancelled"}
        assert "while it ran" in states[0]["error"] and all("shut down" in s["error"] for s in states[1:])
        image_path = done["images"][0]["url"].split("/", 3)[3]
        with urllib.request.urlopen(f"{base}/{image_path}", timeout=60) as answer:  # made before the restart
            assert answer.status == 200 and answer.headers["Content-Type"] == "image/jpeg"


def test_a_demo_folder_left_by_kill_9_is_removed_at_the_next_start(tmp_path):
    with serve(tmp_path) as (process, _):
        process.kill()
        process.wait()
        assert demo_folders(process.pid)
        pid = process.pid
    with serve(tmp_path):
        assert demo_folders(pid) == []


def test_a_world_readable_tls_key_is_refused_and_a_group_readable_one_warned_about(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    certs.server_key.chmod(0o644)
    done = subprocess.run([sys.executable, "-m", "comfyui_krea", "serve", "--demo", "--tls-cert",
                           str(certs.server_cert), "--tls-key", str(certs.server_key)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "can be read by every user" in done.stderr and "chmod 600" in done.stderr
    certs.server_key.chmod(0o640)
    port = free_port()
    with (tmp_path / "tls.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "comfyui_krea", "serve", "--demo", "--port", str(port),
                                    "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                                    "--output", str(tmp_path / "output")], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"https://127.0.0.1:{port}/", certs.ca_cert, process, tmp_path / "tls.log")
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert "can be read by its group" in (tmp_path / "tls.log").read_text()


def test_serve_refuses_what_would_not_fit_in_memory_with_the_numbers(tmp_path):
    with serve(tmp_path, "--max-megapixels", "1000") as (_, base):
        status, answer = call(f"{base}/{T2I}", "POST", {"prompt": "x", "num_images": 4,
                                                        "image_size": {"width": 14142, "height": 14142}})
        assert status == 422 and answer["detail"][0]["loc"] == ["body", "image_size"], answer
        message = answer["detail"][0]["msg"]
        assert "4 images of 14128x14128" in message and "free when the server started" in message, message
        assert call(f"{base}/{T2I}", "POST", {"prompt": "x", "sync_mode": True, **SMALL})[0] == 200


def test_comfyui_serves_what_it_finished_before_a_restart(tmp_path):
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("the ComfyUI routes need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set COMFYUI_DIR")
    import ssl

    def fetch(server, path: str) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(server.certs.ca_cert))
        request = urllib.request.Request(f"{server.url}/{path}", headers={"Authorization": f"Key {API_KEY}"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=120) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    with comfyui(tmp_path, os.environ["COMFYUI_DIR"]) as server:
        context = ssl.create_default_context(cafile=str(server.certs.ca_cert))
        request = urllib.request.Request(f"{server.url}/{T2I}", data=json.dumps({"prompt": "x", **SMALL}).encode(),
                                         headers={"Authorization": f"Key {API_KEY}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=context, timeout=600) as answer:
            request_id = answer.headers["x-fal-request-id"]
            output = json.loads(answer.read())
    with comfyui(tmp_path, os.environ["COMFYUI_DIR"]) as server:  # another process, the same folders
        status, body = fetch(server, f"queue/fal-ai/flux/requests/{request_id}")
        assert status == 200 and json.loads(body)["seed"] == output["seed"]
        image = output["images"][0]["url"].split("/results/", 1)[1]
        assert fetch(server, f"results/{image}")[0] == 200
