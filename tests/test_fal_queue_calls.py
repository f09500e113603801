"""The queue calls as fal's clients read them, in-process over a backend that runs no model (fal_protocol/service.py):
submit's body and header, status with and without logs, the status stream's events and pings, result, cancel, and
fal's error shapes (detail, error_type, x-fal-error-type) for what is not there, not ready or not a queue call. The
facts are docs/fal-protocol.md's: the Python client needs `queue_position` when IN_QUEUE and `logs` always, reads
`error_type` or else the x-fal-error-type header; the JS client takes result.requestId from x-fal-request-id.
"""
from __future__ import annotations

import asyncio
import json
import types

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.service import make_service, serving  # noqa: E402

from comfyui_krea.fal_api import routes  # noqa: E402

T2I = "/fal-ai/flux/krea"
SMALL = {"prompt": "x", "image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}


def run(scenario):
    return asyncio.run(scenario())


def path_of(url: str) -> str:
    return "/" + url.split("/", 3)[3]


async def submitted(client) -> dict:
    answer = await client.post("/queue" + T2I, json=SMALL)
    assert answer.status == 200
    body = await answer.json()
    assert answer.headers["x-fal-request-id"] == body["request_id"]
    return body


def test_submit_answers_the_request_id_its_three_urls_and_its_place_in_the_queue(tmp_path):
    async def scenario():
        service = make_service(tmp_path, hold=True)
        async with serving(service) as client:
            first, second = await submitted(client), await submitted(client)
            base = f"http://{client.host}:{client.port}/queue/fal-ai/flux/requests/"
            for body, position in ((first, 0), (second, 1)):
                url = base + body["request_id"]
                assert body == {"status": "IN_QUEUE", "request_id": body["request_id"], "response_url": url,
                                "status_url": url + "/status", "cancel_url": url + "/cancel",
                                "queue_position": position}
            assert first["request_id"] != second["request_id"]

    run(scenario)


def test_status_sends_logs_only_when_asked_and_the_queue_position_while_waiting(tmp_path):
    async def scenario():
        service = make_service(tmp_path, hold=True)
        async with serving(service) as client:
            first, second = await submitted(client), await submitted(client)
            status = await client.get(path_of(second["status_url"]))
            assert status.status == 200
            assert await status.json() == {k: v for k, v in second.items()} | {"logs": None}
            service.backend.waiting[0].start()  # the first request runs: it logs "started"
            service.backend.waiting.pop(0)
            for flag in ("1", "true", "TRUE", "yes"):
                body = await (await client.get(path_of(first["status_url"]) + f"?logs={flag}")).json()
                assert body["status"] == "IN_PROGRESS"
                assert [entry["message"] for entry in body["logs"]] == ["started"], flag
            for query in ("", "?logs=0", "?logs=false", "?LOGS=1"):
                body = await (await client.get(path_of(first["status_url"]) + query)).json()
                assert body["logs"] is None, query
            queued = await (await client.get(path_of(second["status_url"]) + "?logs=1")).json()
            assert queued["status"] == "IN_QUEUE" and queued["queue_position"] == 0 and queued["logs"] == []

    run(scenario)


def test_cancel_is_202_while_waiting_then_400_already_completed_and_the_result_says_cancelled(tmp_path):
    async def scenario():
        service = make_service(tmp_path, hold=True)
        async with serving(service) as client:
            body = await submitted(client)
            result = await client.get(path_of(body["response_url"]))
            not_ready = await result.json()
            assert result.status == 400 and not_ready["error_type"] == "not_ready"
            assert "IN_QUEUE" in not_ready["detail"] and "COMPLETED" in not_ready["detail"]

            cancel = await client.put(path_of(body["cancel_url"]))
            assert cancel.status == 202 and await cancel.json() == {"status": "CANCELLATION_REQUESTED"}
            again = await client.put(path_of(body["cancel_url"]))
            assert again.status == 400 and await again.json() == {"status": "ALREADY_COMPLETED"}

            result = await client.get(path_of(body["response_url"]))
            assert result.status == 400
            assert result.headers["x-fal-request-id"] == body["request_id"]
            assert result.headers["x-fal-error-type"] == "request_cancelled"
            assert await result.json() == {"detail": "the request was cancelled while it waited",
                                           "error_type": "request_cancelled"}
            status = await (await client.get(path_of(body["status_url"]))).json()
            assert status["status"] == "COMPLETED" and status["error_type"] == "request_cancelled"

    run(scenario)


def test_a_failed_request_is_a_500_with_its_error_type_in_the_body_and_the_header(tmp_path):
    async def scenario():
        service = make_service(tmp_path, hold=True)
        async with serving(service) as client:
            failed, untyped = await submitted(client), await submitted(client)
            service.jobs.get(failed["request_id"]).complete(error="out of memory", error_type="internal_error")
            service.jobs.get(untyped["request_id"]).complete(error="it broke")
            result = await client.get(path_of(failed["response_url"]))
            assert result.status == 500 and result.headers["x-fal-error-type"] == "internal_error"
            assert await result.json() == {"detail": "out of memory", "error_type": "internal_error"}
            result = await client.get(path_of(untyped["response_url"]))
            assert result.status == 500 and result.headers["x-fal-error-type"] == "error"
            assert await result.json() == {"detail": "it broke", "error_type": None}

    run(scenario)


def test_a_finished_result_is_the_output_with_its_request_id(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            body = await submitted(client)
            result = await client.get(path_of(body["response_url"]))
            assert result.status == 200 and result.headers["x-fal-request-id"] == body["request_id"]
            output = await result.json()
            assert output["seed"] is not None and len(output["images"]) == 1
            status = await client.get(path_of(body["status_url"]))
            assert (await status.json())["status"] == "COMPLETED"

    run(scenario)


def test_unknown_requests_and_calls_are_404_and_other_methods_405(tmp_path):
    async def scenario():
        service = make_service(tmp_path, hold=True)
        async with serving(service) as client:
            body = await submitted(client)
            unknown = await client.get("/queue/fal-ai/flux/requests/no-such-id/status")
            assert unknown.status == 404
            assert "no-such-id" in (await unknown.json())["detail"]
            url = path_of(body["response_url"])
            for method, tail, status in (("GET", "/stats", 404), ("PUT", "/status", 404), ("GET", "/cancel", 404),
                                         ("PUT", "", 404), ("DELETE", "", 405), ("PATCH", "/cancel", 405),
                                         ("DELETE", "/status", 405), ("GET", "/status/stream/x", 404)):
                answer = await client.request(method, url + tail)
                assert answer.status == status, (method, tail)
                assert tail.strip("/") in (await answer.json())["detail"], (method, tail)
            assert service.jobs.get(body["request_id"]).done is False  # none of them cancelled it

    run(scenario)


class SteppedSleep:
    """routes' asyncio.sleep, counted: each poll of the status stream is one step, and `at[n]` runs at step n."""

    def __init__(self, at: dict) -> None:
        self.at, self.steps = at, 0

    async def sleep(self, seconds: float) -> None:
        self.steps += 1
        action = self.at.get(self.steps)
        if action is not None:
            action()
        await asyncio.sleep(0)


def test_the_status_stream_sends_each_change_once_new_logs_only_and_pings_while_quiet(tmp_path, monkeypatch):
    monkeypatch.setattr(routes, "STREAM_POLL_S", 0.25)  # binary fractions: four quiet polls make one ping
    monkeypatch.setattr(routes, "STREAM_PING_S", 1.0)

    async def scenario():
        service = make_service(tmp_path, hold=True)
        async with serving(service) as client:
            first, second = await submitted(client), await submitted(client)
            jobs = [service.jobs.get(first["request_id"]), service.jobs.get(second["request_id"])]
            waiting = service.backend.waiting

            def start_second() -> None:
                waiting.remove(jobs[1])
                jobs[1].start()

            stepped = SteppedSleep({2: lambda: service.backend.cancel(jobs[0]), 7: start_second,
                                    16: lambda: jobs[1].log("halfway"),
                                    18: lambda: jobs[1].complete(output={"images": []})})
            monkeypatch.setattr(routes, "asyncio", types.SimpleNamespace(sleep=stepped.sleep))
            answer = await client.get(path_of(second["status_url"]) + "/stream?logs=1")
            assert answer.status == 200
            assert answer.headers["Content-Type"] == "text/event-stream"
            assert answer.headers["Cache-Control"] == "no-cache"
            assert answer.headers["x-fal-request-id"] == second["request_id"]
            return (await asyncio.wait_for(answer.read(), 5.0)).decode()  # a stream that never ends fails

    text = run(scenario)
    events = text.split("\n\n")
    assert events[-1] == ""
    shapes = []
    for event in events[:-1]:
        if event == ": ping":
            shapes.append("ping")
        else:
            assert event.startswith("data: ")
            body = json.loads(event[len("data: "):])
            shapes.append((body["status"], body.get("queue_position"),
                           [entry["message"] for entry in body["logs"]]))
    # A log line is one event: the poll after it, with nothing new, sends nothing.
    assert shapes == [("IN_QUEUE", 1, []), ("IN_QUEUE", 0, []), "ping", ("IN_PROGRESS", None, ["started"]),
                      "ping", "ping", ("IN_PROGRESS", None, ["halfway"]), ("COMPLETED", None, [])], text


def test_a_sync_mode_result_is_handed_out_once_then_404_not_kept(tmp_path):
    async def scenario():
        async with serving(make_service(tmp_path)) as client:
            answer = await client.post("/queue" + T2I, json={**SMALL, "sync_mode": True})
            body = await answer.json()
            first = await client.get(path_of(body["response_url"]))
            assert first.status == 200
            assert (await first.json())["images"][0]["url"].startswith("data:image/png;base64,")
            again = await client.get(path_of(body["response_url"]))
            assert again.status == 404
            error = await again.json()
            assert error["error_type"] == "not_kept" and "sync_mode" in error["detail"]

    run(scenario)
