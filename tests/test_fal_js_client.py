"""The official JavaScript fal client, unchanged (@fal-ai/client 1.10.1 from npm, pinned with its lock file in
tests/fal_protocol/js), against both servers of the pack over TLS, through the client's own proxy option
`proxyUrl: {url: "<base>/proxy", when: "always"}`: every fal call reaches <base>/proxy with the fal URL it meant
in `x-fal-target-url`.

Each server gets one `node client_scenarios.mjs` process; each test asserts on one scenario of its report. Needs
node (>= 18) and npm: the first run installs the client into tests/fal_protocol/js/node_modules (`npm ci`).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fal_protocol.servers import API_KEY, Server, failed, ok
from PIL import Image

JS_DIR = Path(__file__).resolve().parent / "fal_protocol" / "js"
SCRIPT = JS_DIR / "client_scenarios.mjs"
UPLOAD_SIZE = (96, 64)
PROXY_TARGETS = ("https://fal.run/", "https://queue.fal.run/", "https://rest.fal.ai/")

if shutil.which("node") is None or shutil.which("npm") is None:
    if os.environ.get("CI"):  # CI must run these tests
        pytest.fail("the JS client tests need node (>= 18) and npm on PATH", pytrace=False)
    pytest.skip("the JS client tests need node (>= 18) and npm on PATH", allow_module_level=True)
NODE_VERSION = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
if int(NODE_VERSION.lstrip("v").split(".")[0] or 0) < 18:
    pytest.skip(f"@fal-ai/client needs node >= 18 (its global fetch), this is {NODE_VERSION}", allow_module_level=True)


def pinned_version() -> str:
    return json.loads((JS_DIR / "package.json").read_text())["dependencies"]["@fal-ai/client"]


def installed_version() -> str | None:
    manifest = JS_DIR / "node_modules" / "@fal-ai" / "client" / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.is_file() else None


@pytest.fixture(scope="module")
def js_client() -> Path:
    """tests/fal_protocol/js with the pinned client in node_modules, installed once from the registry."""
    if installed_version() != pinned_version():
        command = ["npm", "ci" if (JS_DIR / "package-lock.json").is_file() else "install", "--no-audit", "--no-fund"]
        done = subprocess.run(command, cwd=JS_DIR, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:  # CI must run these tests: there it fails instead
            (pytest.fail if os.environ.get("CI") else pytest.skip)(
                f"`{' '.join(command)}` in {JS_DIR} failed (no npm registry?):\n{done.stderr[-2000:]}")
        assert installed_version() == pinned_version(), "npm installed another @fal-ai/client than package.json pins"
    return JS_DIR


def run_js_client(server: Server, png: Path, key: str = API_KEY) -> dict:
    """The script's report against `server` (its fal routes at server.url, prefix included)."""
    env = {**os.environ, "FAL_KEY": key, "NODE_EXTRA_CA_CERTS": str(server.certs.ca_cert),
           "NO_PROXY": "127.0.0.1,localhost"}
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "FAL_KEY_ID", "FAL_KEY_SECRET"):
        env.pop(name, None)
    done = subprocess.run(["node", str(SCRIPT), server.url, str(png)], cwd=JS_DIR, capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, f"node exited {done.returncode}:\n{done.stderr[-4000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"no report from node:\n{done.stderr[-4000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module", params=["serve", "comfyui"])
def report(request, js_client, fal_server, tmp_path_factory):
    server = fal_server(request.param)
    png = tmp_path_factory.mktemp(f"fal-js-{request.param}") / "upload.png"
    Image.new("RGB", UPLOAD_SIZE, (40, 120, 200)).save(png)
    result = run_js_client(server, png)
    result["_server"] = server
    result["_png"] = png
    return result


def targets(report: dict, name: str) -> list[str]:
    """`METHOD target-path?query` of each proxied call of a scenario, request ids replaced by <id>."""
    out = []
    for call in report[name]["requests"]:
        if call["url"] != "<base>/proxy":
            continue  # the upload PUT (test_every_call_goes_through_the_proxy_but_the_upload_put)
        assert call["target"].startswith(PROXY_TARGETS), call
        path = call["target"].split("/", 3)[3]
        parts = path.split("/")
        if "requests" in parts:
            parts[parts.index("requests") + 1] = "<id>"
        out.append(f"{call['method']} {'/'.join(parts)}")
    return out


def decoded(data_uri: str) -> tuple[str, tuple[int, int], str]:
    header, _, payload = data_uri.partition(",")
    with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
        return header, image.size, image.format


def messages(update: dict) -> list[str]:
    return update["logs"] or []


def test_every_call_goes_through_the_proxy_but_the_upload_put(report):
    direct = []
    for name, entry in report.items():
        if name.startswith("_"):
            continue
        for call in entry["requests"]:
            assert "failed" not in call, (name, call)
            if call["url"] == "<base>/proxy":
                assert call["target"].startswith(PROXY_TARGETS), (name, call)
            else:
                direct.append((name, call["method"], call["url"].rsplit("/", 1)[0], call["status"]))
    # the one call the client makes without its proxy: the PUT to the upload_url the server gave
    assert direct == [("storage_upload", "PUT", "<base>/storage/upload/slot", 200)]


def test_run_sync_mode_returns_a_data_uri_and_the_request_id(report):
    out = ok(report, "run_sync")
    assert targets(report, "run_sync") == ["POST fal-ai/flux/krea"]
    assert len(out["requestId"]) >= 8  # from the x-fal-request-id header
    [image] = out["images"]
    assert {k: image[k] for k in ("width", "height", "content_type", "url_prefix")} == \
        {"width": 64, "height": 48, "content_type": "image/jpeg", "url_prefix": "data:image/jpeg;base64"}
    assert decoded(image["url"]) == ("data:image/jpeg;base64", (64, 48), "JPEG")
    assert out["prompt"] == "x" and out["has_nsfw_concepts"] == [False] and isinstance(out["seed"], int)


def check_subscribed(report: dict, name: str) -> dict:
    out = ok(report, name)
    assert out["enqueued"] == [out["requestId"]] and out["images"] == 1
    statuses = [u["status"] for u in out["updates"]]
    assert statuses[-1] == "COMPLETED" and "IN_PROGRESS" in statuses, statuses
    assert set(statuses) <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}, statuses
    in_progress = [m for u in out["updates"] if u["status"] == "IN_PROGRESS" for m in messages(u)]
    assert any(m.startswith("step ") for m in in_progress), out["updates"]
    final = messages(out["updates"][-1])  # the client gathers the logs of every update (streaming) or the server
    steps = [m.removeprefix("step ").split("/") for m in final if m.startswith("step ")]  # sends them all (polling)
    # every step in order (serve), or those seen by ComfyUI's progress watcher (it samples): increasing, of 40
    assert steps and {total for _, total in steps} == {"40"}, final
    assert [int(k) for k, _ in steps] == sorted({int(k) for k, _ in steps}), final
    return out


def test_subscribe_polling_with_logs(report):
    out = check_subscribed(report, "subscribe_polling")
    calls = targets(report, "subscribe_polling")
    assert calls[0] == "POST fal-ai/flux/krea" and calls[-1] == "GET fal-ai/flux/requests/<id>"
    assert set(calls[1:-1]) == {"GET fal-ai/flux/requests/<id>/status?logs=1"}
    assert out["first_image"]["url"].startswith("<base>/results/")  # no sync_mode: a file URL on this server
    assert out["fetched"]["status"] == 200 and out["fetched"]["content_type"] == "image/jpeg"


def test_subscribe_streaming_with_logs(report):
    check_subscribed(report, "subscribe_streaming")
    assert targets(report, "subscribe_streaming") == [
        "POST fal-ai/flux/krea", "GET fal-ai/flux/requests/<id>/status/stream?logs=1", "GET fal-ai/flux/requests/<id>"]


def test_queue_submit_status_result(report):
    out = ok(report, "queue_submit_status_result")
    assert out["submitted"]["status"] == "IN_QUEUE"
    assert out["statuses"][-1] == "COMPLETED" and set(out["statuses"]) <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}
    assert out["completed"]["metrics"]["inference_time"] > 0 and "error" not in out["completed"]
    assert "step 2/2" in out["completed"]["logs"]
    assert out["result"]["requestId"] == out["submitted"]["request_id"] and out["result"]["seed"] == 11
    assert out["result"]["images"] == [{"width": 64, "height": 48, "content_type": "image/jpeg",
                                        "url_prefix": "https://"}]
    assert out["by_image_to_image_id"] == "COMPLETED"  # by id, the endpoint's sub-path is dropped


def test_validation_error_has_field_errors(report):
    err = failed(report, "validation")
    assert targets(report, "validation") == ["POST fal-ai/flux/krea"]
    assert err["name"] == "ValidationError" and err["status"] == 422
    assert [(e["loc"], e["type"]) for e in err["fieldErrors"]] == [(["body", "prompt"], "missing")]


def test_a_wrong_key_gets_401(report):
    err = failed(report, "wrong_key")
    assert err["name"] == "ApiError" and err["status"] == 401
    assert "Authorization: Key" in err["body"]["detail"]
    assert len(report["wrong_key"]["requests"]) == 1  # not retried


def test_storage_upload_then_image_to_image_with_its_url(report):
    out = ok(report, "storage_upload")
    assert targets(report, "storage_upload") == ["POST storage/upload/initiate?storage_type=fal-cdn-v3",
                                                 "POST fal-ai/flux/krea/image-to-image"]
    assert out["url"].startswith("<base>/storage/files/") and out["url"].endswith(".png")
    assert out["fetched"] == {"status": 200, "content_type": "image/png", "same_bytes": True,
                              "size": report["_png"].stat().st_size}
    [image] = out["result"]
    assert (image["width"], image["height"]) == UPLOAD_SIZE
    assert decoded(image["url"])[1] == UPLOAD_SIZE


def test_cancel_while_queued_and_while_running(report):
    out = ok(report, "cancel_queued")
    assert out["queued"] == {"status": "IN_QUEUE", "queue_position": 0}
    assert out["cancel"] == "accepted"
    assert out["after_cancel"]["status"] == "COMPLETED" and "cancelled" in out["after_cancel"]["error"]
    assert out["queued_result"]["name"] == "ApiError" and out["queued_result"]["status"] == 400
    assert "cancelled" in out["queued_result"]["body"]["detail"]
    assert out["cancel_again"]["status"] == 400 and out["cancel_again"]["body"] == {"status": "ALREADY_COMPLETED"}
    assert out["running_cancel"] == "accepted"
    assert out["running"]["status"] == "COMPLETED" and "cancelled" in out["running"]["error"]
    assert out["running"]["stopped_ms"] < 5000
    assert out["running_result"]["status"] == 400
