"""Finished request records <-> one JSON file each, in a folder beside the result images they serve, so that after a
restart the server still answers for what it finished before (status, result, result image URLs) until retention.

A record is written when its request ends (completed, failed, cancelled, or cancelled at shutdown), replaced
atomically, and removed when it expires; the result images themselves are outputs like any other and stay in the
output folder. On start, records within retention are read back and older ones removed; a record is trusted only
as far as it names files inside the results folder. sync_mode outputs (data URIs) are never written: fal keeps no
copy of them either.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path

from .jobs import COMPLETED, Job, ResultFile

log = logging.getLogger(__name__)

RECORDS_SUBFOLDER = ".records"  # inside the results folder (<output>/fal/.records/<request id>.json)
_REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class RecordFolder:
    def __init__(self, results: Path) -> None:
        self.results = results
        self.folder = results / RECORDS_SUBFOLDER

    def path(self, request_id: str) -> Path | None:
        return self.folder / f"{request_id}.json" if _REQUEST_ID.fullmatch(request_id) else None

    def save(self, job: Job) -> None:
        """Write the record of an ended request (a failure to write is logged; the request itself is unaffected)."""
        path = self.path(job.id)
        if path is None or not job.done:
            return
        with job.lock:
            record = {"id": job.id, "endpoint": job.endpoint, "seed": job.seed, "base_url": job.base_url,
                      "created": job.created, "started": job.started, "finished": job.finished, "logs": job.logs,
                      "output": job.output if job.keep_output else None, "error": job.error,
                      "error_type": job.error_type,
                      "files": [{"name": f.path.name, "content_type": f.content_type, "suffix": f.suffix}
                                for f in job.files]}
        partial = path.with_name(f".{path.name}.part")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(record))
            os.replace(partial, path)
        except OSError as err:
            with contextlib.suppress(OSError):  # no partial file was made, or the records "folder" is not one
                partial.unlink()
            log.warning("could not write the record of fal request %s to %s: %s", job.id, path, err)

    def remove(self, request_id: str) -> None:
        path = self.path(request_id)
        if path is not None:
            path.unlink(missing_ok=True)

    def load(self, retention_s: float, now: float | None = None) -> list[Job]:
        """The records within retention; expired, unreadable or foreign files in the folder are removed."""
        now = time.time() if now is None else now
        if not self.folder.is_dir():
            return []
        jobs = []
        root = self.results.resolve()
        for path in self.folder.iterdir():
            job = None
            if path.is_file() and path.suffix == ".json" and self.path(path.stem) == path:
                try:
                    job = self._job(json.loads(path.read_text()), path.stem, root)
                except (OSError, ValueError, KeyError, TypeError) as err:
                    log.warning("fal request record %s is unreadable (%s); removed", path, err)
            if job is None or now - (job.finished or 0.0) > retention_s:
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                continue
            jobs.append(job)
        return jobs

    def _job(self, record: dict, request_id: str, root: Path) -> Job | None:
        if record["id"] != request_id:
            return None
        files = []
        for entry in record["files"]:
            path = (root / str(entry["name"])).resolve()
            if path.parent != root or not path.is_file():
                return None  # a record that names anything else is not one of ours, or its image is gone
            files.append(ResultFile(path, str(entry["content_type"]), str(entry["suffix"])))
        return Job(endpoint=str(record["endpoint"]), arguments=None, seed=int(record["seed"]), id=request_id,
                   base_url=str(record["base_url"]), created=float(record["created"]), status=COMPLETED,
                   started=record["started"], finished=float(record["finished"]), logs=list(record["logs"]),
                   output=record["output"], error=record["error"], error_type=record["error_type"], files=files)
