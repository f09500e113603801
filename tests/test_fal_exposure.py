"""Both servers of fal's protocol as a hostile client meets them: `serve --demo` and the routes under /fal of the real
ComfyUI (skipped without COMFYUI_DIR), over TLS with an API key. Each class of attack is refused or bounded on both,
with fal's JSON error shape (the library's own tests of the same limits: tests/test_fal_limits.py). Shutdown, restarts
and the TLS key check are tests/test_fal_shutdown.py.
"""
from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import socket
import ssl
import struct
import time

import pytest
from PIL import Image

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.servers import API_KEY, Server, comfyui, serve_demo  # noqa: E402

from comfyui_krea.standalone.certificates import make_certificates  # noqa: E402

T2I, I2I = "fal-ai/flux/krea", "fal-ai/flux/krea/image-to-image"
LONG = {"image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}
LIMITS_ENV = {"KREA_FAL_UPLOAD_QUOTA_MB": "1", "KREA_FAL_ALLOWED_HOSTS": "fal.test", "KREA_FAL_MAX_QUEUE": "2"}
SERVE_LIMITS = ("--upload-quota-mb", "1", "--allowed-host", "fal.test", "--max-queue", "2", "--max-connections", "24")


@pytest.fixture(scope="module", params=["serve", "comfyui"])
def server(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"fal-exposure-{request.param}")
    if request.param == "serve":
        with serve_demo(work, SERVE_LIMITS) as running:
            yield running
        return
    if not os.environ.get("COMFYUI_DIR"):
        pytest.skip("the ComfyUI routes need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set COMFYUI_DIR")
    key = make_certificates(work / "certs").server_key
    key.chmod(0o640)  # ComfyUI loads a key its group can read; the pack warns about it
    with comfyui(work, os.environ["COMFYUI_DIR"], LIMITS_ENV) as running:
        yield running


@pytest.fixture(scope="module")
def finished(server) -> str:
    """results/<id>/<n><ext> of the image a request made."""
    status, _, output = call(server, "POST", T2I, json_body={"prompt": "x", "num_inference_steps": 2,
                                                             "image_size": {"width": 64, "height": 48}})
    assert status == 200, output
    return "results/" + output["images"][0]["url"].split("/results/")[1]


def prefix(server: Server) -> str:
    return "/" + server.address.split("/", 1)[1] if "/" in server.address else ""


def tls_socket(server: Server, timeout: float = 30) -> ssl.SSLSocket:
    host, port = server.address.split("/")[0].split(":")
    context = ssl.create_default_context(cafile=str(server.certs.ca_cert))
    return context.wrap_socket(socket.create_connection((host, int(port)), timeout=timeout), server_hostname=host)


def call(server: Server, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         json_body: object = None) -> tuple[int, dict, object]:
    """(status, headers, JSON or bytes) of one request to <server>/<path>."""
    host, port = server.address.split("/")[0].split(":")
    connection = http.client.HTTPSConnection(host, int(port), timeout=120, context=ssl.create_default_context(
        cafile=str(server.certs.ca_cert)))
    sent = {"Authorization": f"Key {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    data = json.dumps(json_body).encode() if json_body is not None else body
    connection.request(method, prefix(server) + "/" + path.lstrip("/"), body=data, headers=sent)
    answer = connection.getresponse()
    raw = answer.read()
    connection.close()
    try:
        return answer.status, dict(answer.getheaders()), json.loads(raw)
    except ValueError:
        return answer.status, dict(answer.getheaders()), raw


def png(width: int, height: int, noise: bool = False) -> bytes:
    buffer = io.BytesIO()
    image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)) if noise else \
        Image.new("RGB", (width, height), (30, 60, 90))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def relative(server: Server, url: str) -> str:
    return "/" + url.split("/", 3)[3][len(prefix(server).lstrip("/")):].lstrip("/")


def test_1_uploads_take_images_only_and_are_served_inert(server):
    status, _, slot = call(server, "POST", "storage/upload/initiate",
                           json_body={"content_type": "text/html", "file_name": "page.html"})
    assert status == 200, slot
    page = b"<html><script>fetch('/prompt')</script></html>"
    status, _, answer = call(server, "PUT", relative(server, slot["upload_url"]), body=page,
                             headers={"Content-Type": "text/html"})
    assert status == 415 and "png, jpeg" in answer["detail"], answer
    status, _, slot = call(server, "POST", "storage/upload/initiate", json_body={"content_type": "text/html"})
    assert call(server, "PUT", relative(server, slot["upload_url"]), body=png(8, 8),
                headers={"Content-Type": "text/html"})[0] == 200
    status, headers, _ = call(server, "GET", relative(server, slot["file_url"]))
    assert status == 200 and headers["Content-Type"] == "image/png" and headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in headers["Content-Security-Policy"] and headers["Content-Disposition"].startswith("inline")


def test_2_sizes_past_fals_4_megapixels_are_refused_before_queueing(server):
    status, _, answer = call(server, "POST", T2I, json_body={"prompt": "x", "num_images": 4,
                                                             "image_size": {"width": 14142, "height": 14142}})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "image_size"], answer
    assert "limit of 4 megapixels" in answer["detail"][0]["msg"]
    image = "data:image/png;base64," + base64.b64encode(png(2100, 2100)).decode()
    status, _, answer = call(server, "POST", I2I, json_body={"prompt": "x", "image_url": image})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "image_url"], answer
    assert "2100x2100" in answer["detail"][0]["msg"]


def test_3_a_declared_body_over_the_limit_is_413_at_once(server):
    with tls_socket(server) as sock:
        sock.sendall((f"POST {prefix(server)}/{T2I} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Key {API_KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {200 * 1024 * 1024}\r\n\r\n{{").encode())
        started = time.monotonic()
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5, answer[:200]


def test_3_a_trickled_body_is_answered_408_and_closed_after_the_grace(server):
    with tls_socket(server) as sock:
        sock.sendall((f"POST {prefix(server)}/queue/{T2I} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Key {API_KEY}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {1024 * 1024}\r\n\r\n").encode())
        started, answer = time.monotonic(), b""
        sock.settimeout(0.5)
        while time.monotonic() - started < 40:
            try:
                sock.sendall(b" ")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b"too slowly" in answer, answer[:300]
    assert elapsed < 15, elapsed  # the grace is 10 s


def test_3_serve_bounds_its_connections(server):
    if server.name != "serve":
        pytest.skip("inside ComfyUI, connections are ComfyUI's server's (docs/fal-protocol.md)")
    idle = [tls_socket(server) for _ in range(24)]  # --max-connections 24
    try:
        for sock in idle:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # headers begun, never finished
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the server has finished the 24 handshakes on its side
            with tls_socket(server) as extra:
                extra.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = extra.recv(65536)
            if answer.startswith(b"HTTP/1.1 503"):
                break
            time.sleep(0.2)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections" in answer, answer[:200]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    assert call(server, "GET", "queue/fal-ai/flux/requests/none/status")[0] == 404  # served again


def test_3_serve_closes_a_connection_that_never_finishes_its_headers(server):
    if server.name != "serve":
        pytest.skip("inside ComfyUI, connection timeouts are ComfyUI's server's (docs/fal-protocol.md)")
    with tls_socket(server, timeout=40) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and nothing more
        started = time.monotonic()
        try:
            closed = sock.recv(1) == b""
        except OSError:
            closed = True
    assert closed and time.monotonic() - started < 25, time.monotonic() - started  # IDLE_TIMEOUT_S is 15 s


def test_4_upload_fields_and_bytes_are_bounded(server):
    status, _, answer = call(server, "POST", "storage/upload/initiate",
                             json_body={"content_type": "x" * 60_000, "file_name": "a.png"})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "content_type"], answer
    big = png(300, 300, noise=True)  # about 270 KB: four fill the 1 MiB quota
    statuses = []
    for _ in range(5):
        status, _, slot = call(server, "POST", "storage/upload/initiate", json_body={"file_name": "n.png"})
        statuses.append(call(server, "PUT", relative(server, slot["upload_url"]), body=big,
                             headers={"Content-Type": "image/png"})[0])
    assert 413 in statuses and statuses[0] == 200, statuses


def test_5_cross_site_posts_and_foreign_host_names_are_refused(server):
    body = json.dumps({"prompt": "x", **LONG}).encode()
    status, _, answer = call(server, "POST", "queue/" + T2I, body=body, headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in answer["detail"], answer
    status, _, answer = call(server, "POST", "queue/" + T2I, body=body, headers={"Host": "attacker.example:80"})
    assert status == 400 and "attacker.example" in answer["detail"], answer
    status, _, answer = call(server, "GET", "queue/fal-ai/flux/requests/none/status", headers={"Host": "fal.test"})
    assert status == 404, answer  # an allowed name


def test_6_concurrent_submits_never_pass_the_queue_limit(server):
    def submit(_: int) -> tuple[int, object]:
        status, _, answer = call(server, "POST", "queue/" + T2I, json_body={"prompt": "x", **LONG})
        return status, answer

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(submit, range(6)))
    accepted = [answer["request_id"] for status, answer in answers if status == 200]
    assert sorted(status for status, _ in answers) == [200, 200, 503, 503, 503, 503], answers
    for request_id in accepted:
        call(server, "PUT", f"queue/fal-ai/flux/requests/{request_id}/cancel")
    for request_id in accepted:
        for _ in range(600):
            if call(server, "GET", f"queue/fal-ai/flux/requests/{request_id}/status")[2]["status"] == "COMPLETED":
                break
            time.sleep(0.1)


@pytest.mark.parametrize("name, method, path, body, headers, status", [
    ("a 5000-digit integer", "POST", T2I, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", {}, 422),
    ("JSON 100,000 deep", "POST", T2I, b"[" * 100_000 + b"]" * 100_000, {}, 422),
    ("a non-ASCII API key", "GET", "queue/fal-ai/flux/requests/x/status", None, {"Authorization": "Key clé"}, 401),
    ("an over-long label in image_url", "POST", I2I,
     json.dumps({"prompt": "x", "image_url": "https://" + "a" * 70 + ".example/x.png"}).encode(), {}, 422),
    ("a broken IPv6 image_url", "POST", I2I, json.dumps({"prompt": "x", "image_url": "https://[::1/x"}).encode(), {},
     422),
    ("a result name of non-ASCII digits", "GET", "results/{id}/%C2%B2.png", None, {}, 404),
    ("a 5000-digit result name", "GET", "results/{id}/" + "9" * 5000 + ".png", None, {}, 404),
])
def test_7_odd_inputs_are_4xx_in_fals_shape(server, finished, name, method, path, body, headers, status):
    sent = {key: value.encode("utf-8").decode("latin-1") for key, value in headers.items()}  # raw UTF-8 bytes
    assert call(server, "GET", finished)[0] == 200
    got, _, answer = call(server, method, path.replace("{id}", finished.split("/")[1]), body=body, headers=sent)
    assert got == status and isinstance(answer, dict) and "detail" in answer, (name, got, answer)


def test_8_dropped_status_streams_write_no_tracebacks(server):
    status, _, submitted = call(server, "POST", "queue/" + T2I, json_body={"prompt": "x", **LONG})
    assert status == 200, submitted
    tracebacks = server.log.read_text().count("Traceback")
    path = f"{prefix(server)}/queue/fal-ai/flux/requests/{submitted['request_id']}/status/stream"
    for _ in range(20):
        with tls_socket(server) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Key {API_KEY}\r\n\r\n".encode())
            received = b""
            while b"data: " not in received:
                received += sock.recv(65536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    call(server, "PUT", f"queue/fal-ai/flux/requests/{submitted['request_id']}/cancel")
    time.sleep(2)  # each stream notices at its next write
    log = server.log.read_text()
    assert log.count("Traceback") == tracebacks, log[-3000:]


def test_10_a_tls_key_others_can_read_is_warned_about_inside_comfyui(server):
    if server.name != "comfyui":
        pytest.skip("`serve` refuses such a key: tests/test_fal_shutdown.py")
    assert "server-key.pem can be read by its group (mode 640)" in server.log.read_text()
