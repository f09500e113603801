"""The job registry of `serve --ray` (standalone/ray_registry.py) as plain Python (Ray makes it an actor, whose calls
run one at a time): the bound across ingresses, positions, start once, cancel while waiting and while running."""
from __future__ import annotations

from comfyui_krea.fal_api.jobs import Job
from comfyui_krea.standalone.ray_registry import ENDED, RUNNING, WAITING, JobRegistry


def record(request_id: str) -> dict:
    job = Job(endpoint="fal-ai/flux/krea", arguments=None, seed=1, id=request_id, base_url="https://h")
    return {"id": job.id, "endpoint": job.endpoint, "seed": job.seed, "base_url": job.base_url,
            "created": job.created, "logs": [], "files": [], "keep_output": True}


def test_the_bound_holds_across_ingresses_and_frees_when_a_request_ends():
    registry = JobRegistry(retention_s=60)
    assert registry.add_if_room(record("a"), max_active=2) and registry.add_if_room(record("b"), max_active=2)
    assert not registry.add_if_room(record("c"), max_active=2)  # back-pressure: 503 queue_full at the ingress
    registry.complete("a", {"output": {"images": []}})
    assert registry.add_if_room(record("c"), max_active=2)


def test_positions_count_requests_not_started_and_a_request_starts_once():
    registry = JobRegistry(retention_s=60)
    for request_id in "abc":
        registry.add_if_room(record(request_id), max_active=8)
    assert [registry.position(i) for i in "abc"] == [0, 1, 2]
    assert registry.start("b", "host:1") and not registry.start("b", "host:2")
    assert [registry.position(i) for i in "abc"] == [0, None, 1]
    assert registry.get("b")["status"] == "IN_PROGRESS" and registry.get("b")["logs"][0]["message"] == "started"
    assert registry.served_by() == {"host:1": 1}


def test_cancel_ends_a_waiting_request_and_asks_a_running_one_to_stop():
    registry = JobRegistry(retention_s=60)
    registry.add_if_room(record("a"), max_active=8)
    registry.add_if_room(record("b"), max_active=8)
    registry.start("a", "host:1")
    assert registry.cancel("b") == WAITING and not registry.start("b", "host:1")  # never runs
    assert registry.get("b")["error_type"] == "request_cancelled"
    assert registry.cancel("a") == RUNNING and registry.stop_requested("a")
    registry.complete("a", {"error": "the request was cancelled while it ran", "error_type": "request_cancelled"})
    assert registry.cancel("a") == ENDED and not registry.stop_requested("a")
    assert registry.cancel("unknown") is None


def test_the_first_ending_is_kept_and_ended_records_are_bounded():
    registry = JobRegistry(retention_s=60, max_records=2)
    for request_id in "abc":
        registry.add_if_room(record(request_id), max_active=8)
    registry.complete("a", {"error": "x", "error_type": "worker_failed"})
    registry.complete("a", {"output": {"images": []}, "error": None})
    assert registry.get("a")["error_type"] == "worker_failed"
    registry.complete("b", {"output": {}})
    registry.complete("c", {"output": {}})
    assert registry.get("a") is None and registry.get("c") is not None
