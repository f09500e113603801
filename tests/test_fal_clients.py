"""The official Python fal client, unchanged (fal-client 1.0.3 from PyPI), against both servers of the pack over
TLS: `serve --demo` and the routes under /fal of the real ComfyUI (skipped without COMFYUI_DIR). Each server gets
one client process (tests/fal_protocol/python_client.py); each test asserts on one scenario of its report.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fal_client", reason="the protocol tests need the real client: pip install -e '.[test]'")

from fal_protocol.servers import failed, ok, run_python_client  # noqa: E402


@pytest.fixture(scope="module", params=["serve", "comfyui"])
def report(request, fal_server, tmp_path_factory):
    server = fal_server(request.param)
    result = run_python_client(server, tmp_path_factory.mktemp(f"fal-python-{request.param}"))
    result["_server"] = server
    return result


def test_run_sync_mode_returns_data_uris_of_the_requested_size(report):
    out = ok(report, "run_sync_mode")
    assert out["images"] == [{"header": "data:image/jpeg;base64", "size": [64, 48], "format": "JPEG"}]
    assert out["described"] == [{"width": 64, "height": 48, "content_type": "image/jpeg"}]
    output = out["output"]
    assert output["prompt"] == "a red fox" and output["has_nsfw_concepts"] == [False]
    assert isinstance(output["seed"], int) and output["timings"]["inference"] > 0  # a random seed, returned


def test_run_result_urls_serve_the_images(report):
    out = ok(report, "run_url_png_seeded")
    assert out["output"]["seed"] == 7 and len(out["output"]["images"]) == 2
    for image, fetched in zip(out["output"]["images"], out["fetched"]):
        assert image["url"].startswith("https://") and image["content_type"] == "image/png"
        assert fetched == {"status": 200, "content_type": "image/png", "size": [64, 48]}


def test_image_to_image_with_a_data_uri_keeps_the_input_size(report):
    out = ok(report, "run_image_to_image_data_uri")
    assert out["images"][0]["size"] == [80, 48]


def test_validation_errors_are_fastapi_422(report):
    err = failed(report, "run_invalid")
    assert err["class"] == "FalClientHTTPError" and err["status_code"] == 422
    assert err["message"][0]["loc"] == ["body", "prompt"] and err["message"][0]["type"] == "missing"
    err = failed(report, "run_invalid_fields")
    assert err["status_code"] == 422
    fields = {tuple(d["loc"][:2]) for d in err["message"]}
    assert {("body", "num_images"), ("body", "acceleration"), ("body", "image_size"), ("body", "seed")} <= fields


def test_submit_status_result_and_calls_by_id(report):
    out = ok(report, "submit_status_result")
    assert out["statuses"][-1] == "Completed" and set(out["statuses"]) <= {"Queued", "InProgress", "Completed"}
    assert out["metrics"]["inference_time"] > 0 and out["logs"], out
    assert out["by_id_status"] == "Completed" and out["by_id_result_seed"] == out["seed"]


def test_subscribe_with_logs_reports_queue_updates(report):
    out = ok(report, "subscribe_with_logs")
    assert len(out["enqueued"]) == 1 and out["images"] == 1
    kinds = [u["type"] for u in out["updates"]]
    assert kinds[-1] == "Completed" and "InProgress" in kinds
    messages = [m for u in out["updates"] for m in u["logs"]]
    assert any(m.startswith("step ") for m in messages), messages


def test_subscribe_without_callbacks(report):
    assert isinstance(ok(report, "subscribe_plain"), int)


def test_cancel_while_queued_and_while_running(report):
    out = ok(report, "cancel_queued_and_running")
    assert out["queued_status"] == "Queued" and out["queued_position"] == 0
    assert out["after_cancel"] == "Completed" and "cancelled" in out["after_cancel_error"]
    assert out["waiting_result"]["status_code"] == 400
    assert out["cancel_again"]["status_code"] == 400 and "ALREADY_COMPLETED" in out["cancel_again"]["str"]
    assert "cancelled" in out["running_error"] and out["running_result"]["status_code"] == 400
    assert out["running_stopped_s"] < 5


def test_a_wrong_key_gets_401(report):
    err = failed(report, "wrong_key")
    assert err["status_code"] == 401 and "Authorization: Key" in err["message"]


def test_upload_file_then_image_to_image_with_its_url(report):
    out = ok(report, "upload_then_image_to_image")
    assert out["fetched"] == {"status": 200, "content_type": "image/png", "size": [96, 64]}
    assert (out["result"]["width"], out["result"]["height"]) == (96, 64)


def test_unknown_request_id_is_404(report):
    assert failed(report, "unknown_request_id")["status_code"] == 404


def test_async_client(report):
    out = ok(report, "async_client")
    assert out["run"]["size"] == [64, 48] and isinstance(out["submit_seed"], int)
    assert out["updates"][-1] == "Completed" and out["subscribed_images"] == 1


def test_nothing_left_in_the_uploads_folder_but_uploads(report):
    server = report["_server"]
    leftovers = [p.name for p in Path(server.uploads).iterdir() if p.name.startswith(("input-", "."))]
    assert leftovers == []  # decoded image_url inputs are removed when their request ends
