"""The fal server's requests kept in the Ray job registry -> what the protocol's routes use (`serve --ray`).

`SharedJobStore` is the protocol's JobStore with its bound and its lookups moved to the registry (ray_registry.py),
so any ingress answers status, result and cancel of a request any other took, and the queue bound holds across all.
An ingress still keeps the requests it took itself (a `run` call waits on that Job, and its ended record is written
to the records folder as the single server does). `RayBackend` hands each request to the replicas through Serve's
deployment handle and ends the ingress's own Job with what the replica (or, when the replica died, the registry)
says.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import ray

from ..fal_api.backend import WorkflowRefused
from ..fal_api.http_limits import Refusal
from ..fal_api.image_input import InputImage
from ..fal_api.jobs import CANCELLED, IN_PROGRESS, Job, JobStore, Records, ResultFile
from ..fal_api.storage import StoredFile, Uploads, image_type, is_token
from .ray_registry import WAITING
from .runner_backend import model_file, model_folder, use_model

log = logging.getLogger(__name__)

WORKER_FAILED = "worker_failed"  # error_type of a request whose replica died or could not take it


def record_of(job: Job) -> dict:
    """A Job as the registry keeps it (JSON-able; result files by their full path)."""
    with job.lock:
        return {"id": job.id, "endpoint": job.endpoint, "seed": job.seed, "base_url": job.base_url,
                "created": job.created, "status": job.status, "started": job.started, "finished": job.finished,
                "logs": list(job.logs), "output": job.output, "error": job.error, "error_type": job.error_type,
                "keep_output": job.keep_output,
                "files": [{"path": str(f.path), "content_type": f.content_type, "suffix": f.suffix} for f in job.files]}


def refresh(job: Job, record: dict) -> None:
    """Copy what a replica moves along (status, times, logs, result files) from the registry's record."""
    with job.lock:
        job.status, job.started, job.finished = record["status"], record.get("started"), record.get("finished")
        job.logs = list(record.get("logs", []))
        job.output, job.error, job.error_type = record.get("output"), record.get("error"), record.get("error_type")
        job.files = [ResultFile(Path(f["path"]), f["content_type"], f["suffix"]) for f in record.get("files", [])]


class RegistryJob(Job):
    """A registry record as a Job the routes answer from (a copy: changing it changes nothing shared). Until it has
    ended, each status read reads the record again, so a status stream follows the request. For a request this
    ingress took (`own`) in sync_mode, success counts once the replica's answer has reached `own` (it carries the
    output, which the registry never holds): until then such an ended record reads IN_PROGRESS."""
    registry: Any = None
    own: Job | None = None

    def follow(self, record: dict | None) -> None:
        if record is not None:
            refresh(self, record)
        if self.own is not None and self.done and not self.own.done and not self.keep_output and self.error is None:
            with self.lock:
                self.status, self.finished = IN_PROGRESS, None
                self.output, self.error, self.error_type = None, None, None

    def status_json(self, urls: dict[str, str], logs: bool, position: int | None, since_log: int = 0) -> dict:
        if self.own is not None and self.own.done:
            return self.own.status_json(urls, logs, position, since_log)
        if not self.done and self.registry is not None:
            self.follow(ray.get(self.registry.get.remote(self.id)))
        return super().status_json(urls, logs, position, since_log)


def job_of(record: dict, registry: Any = None, own: Job | None = None) -> Job:
    job = RegistryJob(endpoint=record["endpoint"], arguments=None, seed=record["seed"], id=record["id"],
                      base_url=record["base_url"], created=record["created"],
                      keep_output=record.get("keep_output", True))
    job.registry, job.own = registry, own
    job.follow(record)
    return job


def end_with(job: Job, record: dict) -> None:
    """End this ingress's own `job` as its registry record ended."""
    with job.lock:
        job.logs = list(record.get("logs", job.logs))
        job.started = record.get("started") or job.started
        job.files = [ResultFile(Path(f["path"]), f["content_type"], f["suffix"]) for f in record.get("files", [])]
    job.complete(output=record.get("output"), error=record.get("error"), error_type=record.get("error_type"))


class SharedJobStore(JobStore):
    def __init__(self, registry: Any, retention_s: float, max_active: int, records: Records | None = None) -> None:
        super().__init__(retention_s, max_active, records)
        self.registry = registry

    def add_if_room(self, job: Job) -> bool:
        if not ray.get(self.registry.add_if_room.remote(record_of(job), self.max_active)):
            return False
        return super().add_if_room(job)  # this ingress's own requests never outnumber all of them

    def discard(self, job: Job) -> None:
        self.registry.discard.remote(job.id)
        super().discard(job)

    def load(self) -> int:
        restored = super().load()
        if restored:
            ray.get(self.registry.restore.remote([record_of(job) for job in super().all()]))
        return restored

    def get(self, request_id: str) -> Job | None:
        """The registry's record; this ingress's own Job once it has ended here (a sync_mode output lives only there:
        the registry never holds one, so it is handed out once, by the ingress that took the request)."""
        own = super().get(request_id)
        if own is not None and own.done:
            return own
        record = ray.get(self.registry.get.remote(request_id))
        return None if record is None else job_of(record, self.registry, own)


class RayBackend:
    """The protocol's Backend over a Serve deployment of KreaReplica (ray_replica.py) and the job registry."""

    def __init__(self, handle: Any, registry: Any, output_dir: Path, model_name: str | None = None) -> None:
        self.handle = handle
        self.model_name = model_name  # serve --model: the transformer file every request runs
        self.registry = registry
        self.output_dir = output_dir
        self._images: dict[str, dict[str, Any]] = {}  # request id -> LoadImage value -> its decoded image
        self._calls: dict[str, tuple[Job, Any]] = {}  # this ingress's requests handed on: the Job, Serve's response
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def model_folder(self, folder: str) -> Path:
        return model_folder(folder)  # this ingress's --models (the LoRA endpoints resolve their files there)

    def model_file(self, folder: str, name: str) -> Path | None:
        return model_file(folder, name)

    def image_reference(self, job: Job, image: InputImage) -> str:
        held = self._images.setdefault(job.id, {})
        name = f"fal-input-{len(held)}"
        held[name] = image.image  # sent to the replica with the workflow (Ray pickles PIL images)
        job.on_end(lambda: self._images.pop(job.id, None))
        return name

    async def submit(self, job: Job, prompt: dict) -> None:
        if self._closed:
            raise WorkflowRefused("the server is shutting down")
        use_model(prompt, self.model_name)
        request = {"id": job.id, "endpoint": job.endpoint, "arguments": job.arguments, "seed": job.seed,
                   "base_url": job.base_url, "keep_output": job.keep_output}
        response = self.handle.run.remote(request, prompt, self._images.get(job.id, {}))
        self._calls[job.id] = (job, response)
        task = asyncio.get_running_loop().create_task(self._follow(job, response))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, job: Job, response: Any) -> None:
        try:
            record = await response
        except Exception as err:  # the replica died mid-run, the deployment is gone, Serve's queue is full, ...
            log.warning("fal request %s: its replica failed (%s: %s)", job.id, type(err).__name__, err)
            ending = {"error": f"the worker running the request stopped before it finished ({type(err).__name__}); "
                               "submit it again", "error_type": WORKER_FAILED}
            record = await self.registry.complete.remote(job.id, ending)
        finally:
            self._calls.pop(job.id, None)
        if record is not None:
            end_with(job, record)

    def position(self, job: Job) -> int | None:
        return ray.get(self.registry.position.remote(job.id))

    def cancel(self, job: Job) -> None:
        found = ray.get(self.registry.cancel.remote(job.id))
        own = self._calls.get(job.id)
        if found == WAITING and own is not None:
            own[1].cancel()  # out of Serve's queue too; the replica would skip it anyway (registry.start)
            end_with(own[0], ray.get(self.registry.get.remote(job.id)) or {"error": "cancelled",
                                                                             "error_type": CANCELLED})

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self) -> None:
        """No more requests from this ingress: its waiting ones end cancelled, its running ones are stopped."""
        self._closed = True
        for job, _ in list(self._calls.values()):
            if not job.done:
                self.cancel(job)

    def close(self, timeout_s: float = 60.0) -> bool:
        return True  # nothing runs in this process; the replicas stop with the deployment


class SharedUploads(Uploads):
    """The uploads folder that several ingresses share (one machine, or a shared folder): slots and tokens signed
    with the registry's key, so any ingress takes them, and a file another ingress stored is found in the folder.
    The quota is counted per ingress."""

    def get(self, file_id: str) -> StoredFile | None:
        stored = super().get(file_id)
        if stored is not None or not is_token(file_id):
            return stored
        path = self.folder / file_id
        try:
            created = path.stat().st_mtime
            if not path.is_file() or path.is_symlink() or time.time() - created > self.retention_s:
                return None
            with path.open("rb") as file:
                content_type = image_type(file.read(self.max_bytes + 1))
        except (OSError, Refusal):
            return None
        return StoredFile(path, content_type, "upload", created)
