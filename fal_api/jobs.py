"""A request taken -> its record (queued, running, completed), its logs, and the status JSON the clients parse.

Records are kept until the retention limit after they finish (at most MAX_RECORDS of them), written to disk when a
records folder is given (records.py) so that a restart keeps them; the backends (the standalone runner's,
ComfyUI's queue) move them along from their own thread, so every change goes through the record's lock. A record
lets go of its input when it ends (an image-to-image data URI can be 64 MB), and a sync_mode output (data URIs) once
it has been handed out. Status shapes are
what the official clients parse (docs/fal-protocol.md): IN_QUEUE needs queue_position, IN_PROGRESS and COMPLETED
need `logs` (null unless asked for), a failed request is COMPLETED with `error` and `error_type` (the clients know
no other status).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"
CANCELLED = "request_cancelled"  # error_type of a request stopped by a cancel
EXPIRY_INTERVAL_S = 60.0  # how often lookups scan for expired records and uploads
# Finished records kept at most, the oldest dropped first: a flood of requests cancelled at once stays bounded (the
# records of requests that made images are a few kilobytes each).
MAX_RECORDS = 4096


def log_entry(message: str, level: str = "INFO") -> dict:
    """A log line as the clients parse it."""
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"message": message, "level": level, "source": "USER", "timestamp": stamp, "labels": {}}


@dataclass
class ResultFile:
    """An image served at <base>/results/<request id>/<index><suffix> until the record expires."""
    path: Path
    content_type: str
    suffix: str


@dataclass
class Job:
    endpoint: str
    arguments: Any  # the validated input (fal_api.schema); None once the request has ended
    seed: int
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    base_url: str = ""  # where the client reached this server (scheme://host[:port]/prefix): result URLs use it
    created: float = field(default_factory=time.time)
    status: str = IN_QUEUE
    started: float | None = None
    finished: float | None = None
    logs: list[dict] = field(default_factory=list)
    output: dict | None = None
    error: str | None = None
    error_type: str | None = None
    files: list[ResultFile] = field(default_factory=list)
    keep_output: bool = True  # False (sync_mode): the output is handed out once, then dropped
    wants_previews: bool = False  # a streamed request: the backend hands over a preview image per step
    # The latest preview ({url: data URI, width, height, content_type}), not recorded; a stream's outlives the end
    # until its output is taken, so that a preview made after the stream's last poll is still sent.
    preview: dict | None = None
    previews_made: int = 0
    # What the backend gave the workflow for the request's input images, taken back once when it ends.
    _on_end: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_end(self, action: Callable[[], None]) -> None:
        """Run `action` once when the request ends (at once if it has ended)."""
        with self.lock:
            if self.status != COMPLETED:
                self._on_end.append(action)
                return
        action()

    def log(self, message: str, level: str = "INFO") -> None:
        entry = log_entry(message, level)
        with self.lock:
            self.logs.append(entry)

    def set_preview(self, image: dict) -> None:
        """The latest preview of a streamed request (from the backend's thread); only the latest is kept."""
        with self.lock:
            self.preview, self.previews_made = image, self.previews_made + 1

    def take_output(self) -> dict | None:
        """The output, dropped once handed out when it is not kept (sync_mode: fal keeps no copy either)."""
        with self.lock:
            output = self.output
            if not self.keep_output:
                self.output = None
            self.preview = None  # a stream's last preview is sent before its output, or never
            return output

    def start(self) -> bool:
        """IN_QUEUE -> IN_PROGRESS; True for the one call that made the change (it logs "started")."""
        with self.lock:
            if self.status != IN_QUEUE:
                return False
            self.status, self.started = IN_PROGRESS, time.time()
        self.log("started")
        return True

    def complete(self, output: dict | None = None, error: str | None = None, error_type: str | None = None) -> None:
        """The end, once: the output, or the error (the record keeps the first ending)."""
        with self.lock:
            if self.status == COMPLETED:
                return
            self.status, self.finished = COMPLETED, time.time()
            self.output, self.error, self.error_type = output, error, error_type
            self.arguments = None
            if not self.wants_previews:
                self.preview = None
            actions, self._on_end = self._on_end, []
        for action in actions:
            action()

    @property
    def done(self) -> bool:
        return self.status == COMPLETED

    def inference_time(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return round(self.finished - self.started, 3)

    def status_json(self, urls: dict[str, str], logs: bool, position: int | None,
                    since_log: int = 0) -> dict:
        """The status body; `logs` only when asked for (from entry `since_log`: the stream sends each once)."""
        with self.lock:
            body: dict[str, Any] = {"status": self.status, "request_id": self.id, **urls}
            body["logs"] = list(self.logs[since_log:]) if logs else None
            if self.status == IN_QUEUE:
                body["queue_position"] = position if position is not None else 0
            elif self.status == COMPLETED:
                seconds = self.inference_time()
                body["metrics"] = {"inference_time": seconds} if seconds else {}
                if self.error is not None:
                    body["error"], body["error_type"] = self.error, self.error_type
            return body

    async def wait(self, poll_s: float = 0.05) -> None:
        """Until the job has ended (from the event loop; the backends end it from their threads)."""
        while not self.done:
            await asyncio.sleep(poll_s)


class Records(Protocol):
    """Where ended records are kept on disk (records.RecordFolder)."""

    def save(self, job: Job) -> None: ...

    def remove(self, request_id: str) -> None: ...

    def load(self, retention_s: float) -> list[Job]: ...


class JobStore:
    """The records by id, dropped `retention_s` after they end (with their served files' URLs), or sooner when more
    than `max_records` have ended; with `records`, written there as they end and read back by `load`."""

    def __init__(self, retention_s: float, max_active: int, records: Records | None = None,
                 max_records: int = MAX_RECORDS) -> None:
        self.retention_s = retention_s
        self.max_active = max_active
        self.records = records
        self.max_records = max_records
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._next_expiry = 0.0

    def add_if_room(self, job: Job) -> bool:
        """Adds `job` when fewer than max_active are waiting or running, in one step (so that requests awaiting
        their images cannot all pass the check before any is added); False when the queue is full."""
        with self._lock:
            if self._active() >= self.max_active:
                return False
            self._jobs[job.id] = job
        job.on_end(lambda: self._ended(job))
        return True

    def discard(self, job: Job) -> None:
        """Forget a request that was refused before it was queued (no record is kept)."""
        with self._lock:
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]

    def load(self) -> int:
        """The records kept on disk (the newest max_records of them), back in the store; how many."""
        if self.records is None:
            return 0
        restored = sorted(self.records.load(self.retention_s), key=lambda job: job.finished or 0.0)
        for old in restored[:max(0, len(restored) - self.max_records)]:
            self.records.remove(old.id)
        restored = restored[max(0, len(restored) - self.max_records):]
        with self._lock:
            for job in restored:
                self._jobs.setdefault(job.id, job)
        return len(restored)

    def _ended(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.id) is not job:
                return  # discarded
            ended = [other for other in self._jobs.values() if other.done]
            dropped = sorted(ended, key=lambda other: other.finished or 0.0)[:len(ended) - self.max_records] \
                if len(ended) > self.max_records else []
            for old in dropped:
                del self._jobs[old.id]
        if self.records is not None:
            self.records.save(job)
            for old in dropped:
                self.records.remove(old.id)

    def get(self, request_id: str) -> Job | None:
        self.expire()
        with self._lock:
            return self._jobs.get(request_id)

    def active(self) -> int:
        """Requests waiting or running."""
        with self._lock:
            return self._active()

    def _active(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.done)

    def expire(self, now: float | None = None) -> None:
        """Drop the records past retention (a scan of all: called on every lookup, so done once a minute)."""
        if now is None:
            now = time.time()
            if now < self._next_expiry:
                return
            self._next_expiry = now + EXPIRY_INTERVAL_S
        with self._lock:
            old = [i for i, job in self._jobs.items() if job.done and now - (job.finished or now) > self.retention_s]
            for request_id in old:
                del self._jobs[request_id]
        if self.records is not None:
            for request_id in old:
                self.records.remove(request_id)

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())
