"""Malformed and hostile requests to `serve` (TLS, API key): each gets a 4xx before any work, nothing is written
outside the server's folders, and the server still serves afterwards.
"""
from __future__ import annotations

import base64
import io
import json
import ssl
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.servers import API_KEY, serve_demo  # noqa: E402

T2I, I2I = "/fal-ai/flux/krea", "/fal-ai/flux/krea/image-to-image"
SMALL = {"image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}


def png_data_uri(width: int = 32, height: int = 32, raw: bytes | None = None) -> str:
    if raw is None:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
        raw = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def bomb_png() -> bytes:
    """A 20000 x 20000 one-bit PNG: a few kilobytes on the wire, 1.2 GB once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("fal-hostile")
    with serve_demo(work, ("--allow-remote-images",)) as running:
        yield running, work


def call(server, method: str, path: str, body: object = None, raw: bytes | None = None,
         headers: dict | None = None, key: str | None = API_KEY) -> tuple[int, object]:
    import http.client

    running, _ = server
    host, port = running.address.split(":")
    connection = http.client.HTTPSConnection(host, int(port), timeout=60,
                                             context=ssl.create_default_context(cafile=str(running.certs.ca_cert)))
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    sent = {"Content-Type": "application/json", **({"Authorization": f"Key {key}"} if key else {}), **(headers or {})}
    connection.request(method, path, body=data, headers=sent)
    answer = connection.getresponse()
    text = answer.read()
    connection.close()
    try:
        return answer.status, json.loads(text)
    except ValueError:
        return answer.status, text.decode(errors="replace")


HOSTILE = [  # (name, method, path, body or raw bytes, expected status, a word the answer holds)
    ("not json", "POST", T2I, b"{prompt: x", 422, "json_invalid"),
    ("a json list", "POST", T2I, [1, 2], 422, "dictionary"),
    ("a json string", "POST", T2I, "prompt", 422, "dictionary"),
    ("prompt missing", "POST", T2I, {}, 422, "missing"),
    ("prompt a number", "POST", T2I, {"prompt": 5}, 422, "string"),
    ("steps 0", "POST", T2I, {"prompt": "x", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ("steps 51", "POST", T2I, {"prompt": "x", "num_inference_steps": 51}, 422, "num_inference_steps"),
    ("steps a string", "POST", T2I, {"prompt": "x", "num_inference_steps": "28"}, 422, "integer"),
    ("steps a fraction", "POST", T2I, {"prompt": "x", "num_inference_steps": 2.5}, 422, "integer"),
    ("guidance NaN", "POST", T2I, b'{"prompt": "x", "guidance_scale": NaN}', 422, "finite"),
    ("guidance infinite", "POST", T2I, b'{"prompt": "x", "guidance_scale": 1e999}', 422, "guidance_scale"),
    ("guidance 25", "POST", T2I, {"prompt": "x", "guidance_scale": 25}, 422, "guidance_scale"),
    ("seed negative", "POST", T2I, {"prompt": "x", "seed": -1}, 422, "seed"),
    ("seed over 2^64", "POST", T2I, {"prompt": "x", "seed": 2**64}, 422, "seed"),
    ("num_images 5", "POST", T2I, {"prompt": "x", "num_images": 5}, 422, "num_images"),
    ("unknown preset", "POST", T2I, {"prompt": "x", "image_size": "huge"}, 422, "image_size"),
    ("negative width", "POST", T2I, {"prompt": "x", "image_size": {"width": -16, "height": 64}}, 422, "width"),
    ("width 100000", "POST", T2I, {"prompt": "x", "image_size": {"width": 100000, "height": 64}}, 422, "width"),
    ("unknown acceleration", "POST", T2I, {"prompt": "x", "acceleration": "max"}, 422, "acceleration"),
    ("unknown format", "POST", T2I, {"prompt": "x", "output_format": "gif"}, 422, "output_format"),
    ("safety checker a string", "POST", T2I, {"prompt": "x", "enable_safety_checker": "no"}, 422, "boolean"),
    ("huge prompt", "POST", T2I, {"prompt": "x" * 30_000}, 422, "prompt"),
    ("image_url missing", "POST", I2I, {"prompt": "x"}, 422, "image_url"),
    ("strength 0", "POST", I2I, {"prompt": "x", "image_url": png_data_uri(), "strength": 0}, 422, "strength"),
    ("broken data URI", "POST", I2I, {"prompt": "x", "image_url": "data:image/png;base64,!!!"}, 422, "base64"),
    ("data URI without comma", "POST", I2I, {"prompt": "x", "image_url": "data:image/png;base64"}, 422, "','"),
    ("not an image", "POST", I2I, {"prompt": "x", "image_url": png_data_uri(raw=b"GIF89a but not really")}, 422,
     "not an image"),
    ("truncated png", "POST", I2I, {"prompt": "x", "image_url": png_data_uri(raw=base64.b64decode(
        png_data_uri(64, 64).split(",")[1])[:60])}, 422, "image"),
    ("decompression bomb", "POST", I2I, {"prompt": "x", "image_url": png_data_uri(raw=bomb_png())}, 422, "pixels"),
    ("file URL", "POST", I2I, {"prompt": "x", "image_url": "file:///etc/passwd"}, 422, "data URI or an http(s)"),
    ("metadata address", "POST", I2I, {"prompt": "x", "image_url": "http://169.254.169.254/latest/x.png"}, 422,
     "link-local"),
    ("loopback by name", "POST", I2I, {"prompt": "x", "image_url": "http://localhost:9/x.png"}, 422, "loopback"),
    ("private literal", "POST", I2I, {"prompt": "x", "image_url": "http://10.0.0.1/x.png"}, 422, "private"),
    ("unknown endpoint", "POST", "/fal-ai/flux/dev", {"prompt": "x"}, 404, "no endpoint"),
    ("GET on run", "GET", T2I, None, 405, "POST"),
    ("unknown request id", "GET", "/queue/fal-ai/flux/requests/nope/status", None, 404, "no request"),
    ("traversal request id", "GET", "/queue/fal-ai/flux/requests/..%2F..%2Fetc%2Fpasswd/status", None, 404,
     "no request"),
    ("cancel unknown id", "PUT", "/queue/fal-ai/flux/requests/0000/cancel", None, 404, "no request"),
    ("traversal result file", "GET", "/results/..%2F..%2F..%2Fetc/passwd", None, 404, "no such result"),
    ("traversal upload file", "GET", "/storage/files/..%2F..%2Fserve.log/x", None, 404, "storage"),
    ("unknown upload slot", "PUT", "/storage/upload/slot/AAAAAAAAAAAAAAAAAAAAAAAA", b"x", 404, "no open upload"),
    ("cdn upload without token", "POST", "/files/upload", b"x", 401, "token"),
    ("proxy to another host", "POST", "/proxy", {"prompt": "x"}, 400, "not a fal URL"),
]


@pytest.mark.parametrize("name, method, path, body, status, word", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_is_refused_before_any_work(server, name, method, path, body, status, word):
    running, work = server
    before = tree(work)
    raw = body if isinstance(body, bytes) else None
    headers = {"x-fal-target-url": "https://evil.example/fal-ai/flux/krea"} if path == "/proxy" else None
    key = None if path == "/files/upload" else API_KEY  # with the server's key, an upload is allowed
    got, answer = call(server, method, path, None if raw is not None else body, raw=raw, headers=headers, key=key)
    assert got == status, (name, answer)
    assert word in json.dumps(answer), (name, answer)
    after = tree(work)
    written = {k for k in after if after[k] != before.get(k)} - {"serve.log"}
    assert written == set(), written  # no job ran, no upload or input file stayed


def test_no_key_is_401_and_a_body_over_the_limit_is_413(server):
    assert call(server, "POST", T2I, {"prompt": "x"}, key=None)[0] == 401
    status, answer = call(server, "POST", T2I, raw=b'{"prompt": "' + b"a" * (65 * 1024 * 1024) + b'"}')
    assert status == 413, answer


def test_cancel_twice_and_the_server_still_serves(server):
    running, work = server
    status, submitted = call(server, "POST", "/queue" + T2I, {"prompt": "x", **SMALL})
    assert status == 200, submitted
    request = f"/queue/fal-ai/flux/requests/{submitted['request_id']}"
    for _ in range(600):
        status, state = call(server, "GET", request + "/status")
        if state["status"] == "COMPLETED":
            break
    assert call(server, "PUT", request + "/cancel")[0] == 400  # already completed
    assert call(server, "PUT", request + "/cancel")[0] == 400
    status, output = call(server, "POST", T2I, {"prompt": "still here", "sync_mode": True, **SMALL})
    assert status == 200 and output["prompt"] == "still here" and output["images"][0]["width"] == 32
    outside = [k for k in tree(work) if not k.startswith(("output/", "certs/", "serve.log"))]
    assert outside == []


def test_a_full_queue_answers_503_with_a_clear_body_and_recovers(server):
    """The server was started with --max-queue 8: the ninth request waiting or running is refused with 503 (a
    code the Python client does not retry without "nginx" in the body: no retry storm), then room comes back."""
    long = {"prompt": "x", "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50}
    ids = []
    for _ in range(8):
        status, submitted = call(server, "POST", "/queue" + T2I, long)
        assert status == 200, submitted
        ids.append(submitted["request_id"])
    status, answer = call(server, "POST", "/queue" + T2I, long)
    assert status == 503 and "queue is full (8 requests" in answer["detail"] and "nginx" not in json.dumps(answer)
    for request_id in reversed(ids):
        assert call(server, "PUT", f"/queue/fal-ai/flux/requests/{request_id}/cancel")[0] == 202
    for request_id in ids:
        for _ in range(600):
            status, state = call(server, "GET", f"/queue/fal-ai/flux/requests/{request_id}/status")
            if state["status"] == "COMPLETED":
                break
        assert "cancelled" in state["error"]
    status, output = call(server, "POST", T2I, {"prompt": "room again", "sync_mode": True, **SMALL})
    assert status == 200 and output["prompt"] == "room again"
