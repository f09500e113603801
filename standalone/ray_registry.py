"""Request records shared by every ingress and replica of `serve --ray` -> one named Ray actor (the job registry).

An ingress (the fal server's HTTP front, `serve --ray`) adds a record when it takes a request, any ingress reads it
back for status, result and cancel, and the replica that runs the request moves it along (started, log lines, the
end). Ray runs an actor's calls one at a time, so each call below is atomic: the queue bound is checked and taken
in one step across all ingresses, and a request starts at most once (a request cancelled while it waited never
starts). Queue positions count the requests taken earlier, by any ingress, that have not started.

A record is the JSON-able dict `ray_jobs.record_of` makes of a Job. Records stay `retention_s` after they end, at
most MAX_RECORDS ended ones (as the single server's JobStore). The registry also hands every ingress the same key
for signing upload slots and tokens, so that a slot one ingress handed out is taken by any.

This module does not import Ray: `ray_serve.py` makes the class an actor (named REGISTRY_NAME, detached).
"""
from __future__ import annotations

import secrets
import time

from ..fal_api.jobs import CANCELLED, COMPLETED, IN_PROGRESS, IN_QUEUE, MAX_RECORDS, log_entry

REGISTRY_NAME = "krea-fal-registry"
NAMESPACE = "comfyui_krea"
WAITING, RUNNING, ENDED = "waiting", "running", "ended"  # what cancel found


class JobRegistry:
    def __init__(self, retention_s: float, max_records: int = MAX_RECORDS) -> None:
        self.retention_s = retention_s
        self.max_records = max_records
        self._records: dict[str, dict] = {}
        self._waiting: list[str] = []  # ids taken and not started, oldest first (dicts keep insertion order)
        self._stop: set[str] = set()  # running requests asked to stop
        self._key = secrets.token_bytes(32)

    def signing_key(self) -> bytes:
        return self._key

    def add_if_room(self, record: dict, max_active: int) -> bool:
        """Adds the record of a request just taken when fewer than `max_active` wait or run (across every ingress)."""
        self._expire()
        if sum(1 for r in self._records.values() if r["status"] != COMPLETED) >= max_active:
            return False
        self._records[record["id"]] = dict(record, status=IN_QUEUE)
        self._waiting.append(record["id"])
        return True

    def restore(self, records: list[dict]) -> None:
        """Ended records an ingress read back from its records folder at start."""
        for record in records:
            self._records.setdefault(record["id"], record)

    def discard(self, request_id: str) -> None:
        """A request refused after its slot was taken: no record."""
        self._records.pop(request_id, None)
        self._drop_waiting(request_id)

    def get(self, request_id: str) -> dict | None:
        self._expire()
        return self._records.get(request_id)

    def position(self, request_id: str) -> int | None:
        try:
            return self._waiting.index(request_id)
        except ValueError:
            return None

    def start(self, request_id: str, replica: str) -> bool:
        """IN_QUEUE -> IN_PROGRESS on `replica`; False when the request has ended (cancelled while it waited) or is
        unknown, so the replica skips it."""
        record = self._records.get(request_id)
        if record is None or record["status"] != IN_QUEUE:
            return False
        self._drop_waiting(request_id)
        record.update(status=IN_PROGRESS, started=time.time(), replica=replica)
        record["logs"] = [*record.get("logs", []), log_entry("started")]
        return True

    def log(self, request_id: str, entry: dict) -> None:
        record = self._records.get(request_id)
        if record is not None and record["status"] != COMPLETED:
            record["logs"] = [*record.get("logs", []), entry]

    def stop_requested(self, request_id: str) -> bool:
        return request_id in self._stop

    def cancel(self, request_id: str) -> str | None:
        """WAITING: ended now as cancelled; RUNNING: its replica is told to stop (it ends it); ENDED; None: unknown."""
        record = self._records.get(request_id)
        if record is None:
            return None
        if record["status"] == IN_QUEUE:
            self.complete(request_id, {"error": "the request was cancelled while it waited", "error_type": CANCELLED})
            return WAITING
        if record["status"] == IN_PROGRESS:
            self._stop.add(request_id)
            return RUNNING
        return ENDED

    def complete(self, request_id: str, ending: dict) -> dict | None:
        """The end, once (the first ending is kept): `ending` holds output, error, error_type, files, logs. The
        record as it ended, None when unknown."""
        record = self._records.get(request_id)
        if record is None:
            return None
        if record["status"] != COMPLETED:
            self._drop_waiting(request_id)
            self._stop.discard(request_id)
            record.update(ending, status=COMPLETED, finished=time.time())
            self._bound()
        return record

    def served_by(self) -> dict[str, int]:
        """How many requests each replica started (what the tests and the benchmark read)."""
        counts: dict[str, int] = {}
        for record in self._records.values():
            if record.get("replica"):
                counts[record["replica"]] = counts.get(record["replica"], 0) + 1
        return counts

    def _drop_waiting(self, request_id: str) -> None:
        if request_id in self._waiting:
            self._waiting.remove(request_id)

    def _bound(self) -> None:
        ended = sorted((r for r in self._records.values() if r["status"] == COMPLETED),
                       key=lambda r: r.get("finished") or 0.0)
        for old in ended[:max(0, len(ended) - self.max_records)]:
            del self._records[old["id"]]

    def _expire(self) -> None:
        now = time.time()
        for request_id in [i for i, r in self._records.items()
                           if r["status"] == COMPLETED and now - (r.get("finished") or now) > self.retention_s]:
            del self._records[request_id]

