"""One fal request (its validated input, the API workflow, its decoded input images) -> the workflow run on this
replica's models, and the request's ended record (`serve --ray`; the class Serve deploys N times).

A replica holds its models once (the standalone host's one model cache keeps them between runs) and runs one
request at a time (the deployment's max_ongoing_requests is 1; Serve queues the rest, bounded). It moves the request
along in the job registry (ray_registry.py), so any ingress answers its status: started, "running <node>" and
"step k/N" lines, then the end. A cancel reaches it through the registry: a watcher thread polls it while the
request runs and sets the host's interrupt, which the transformer checks before every block. The workflow is
validated and the memory pre-flight run here, on the machine that runs it, before any model is touched: a request
they refuse ends with `workflow_refused` / `request_too_large` in its record (the single server refuses those at
submit; an ingress of a cluster may not have the models). Images are saved under this replica's output folder,
which is the ingress's when both are on one machine (with several machines: a folder every machine sees at the same
path, or sync_mode, whose images travel in the response).

Ray is imported by the caller (ray_serve.py), never at the pack's import.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import ray
import torch

from ..fal_api.jobs import Job, log_entry
from ..nodes.host import standalone_host
from ..sampling.parameters import nearest_multiple
from .node_classes import PACK_CLASSES, decoded_image_loader
from .preflight import available_memory, memory_problem
from .ray_jobs import record_of
from .ray_registry import NAMESPACE, REGISTRY_NAME
from .runner import CheckedPrompt, validate
from .runner_backend import SERVER_ADVICE, run_job

STOP_POLL_S = 0.1  # how often a running request's cancel flag is read from the registry


class KreaReplica:
    def __init__(self, models: str | None, tokenizers: str | None, output: str, memory_check: bool = True,
                 threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)  # CPU replicas share the machine's cores: one each, not all each
        self.output_dir = Path(output)
        standalone_host().configure(models_dir=models, tokenizer_dir=tokenizers, output_dir=self.output_dir)
        self.registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
        self.images: dict[str, Any] = {}
        self.classes = {**PACK_CLASSES, "LoadImage": decoded_image_loader(self.images)}
        self.device = standalone_host().torch_device()
        free, where = available_memory(self.device)
        self.memory = (free, f"{where} (free when the replica started)") if memory_check else None
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # host:pid, in each record it started

    async def run(self, request: dict, prompt: dict, images: dict[str, Any]) -> dict | None:
        """The request's record once it ended here (None when unknown to the registry)."""
        import asyncio

        return await asyncio.to_thread(self.run_now, request, prompt, images)

    def run_now(self, request: dict, prompt: dict, images: dict[str, Any]) -> dict | None:
        request_id = request["id"]
        if not ray.get(self.registry.start.remote(request_id, self.name)):
            return ray.get(self.registry.get.remote(request_id))  # cancelled while it waited
        job = Job(endpoint=request["endpoint"], arguments=request["arguments"], seed=request["seed"], id=request_id,
                  base_url=request["base_url"], keep_output=request["keep_output"])
        job.start()
        self.images.clear()
        self.images.update(images)
        stop, ended = threading.Event(), threading.Event()
        watcher = threading.Thread(target=self._watch, args=(request_id, stop, ended), daemon=True)
        watcher.start()
        try:
            self._run(job, prompt, stop)
        finally:
            ended.set()
            self.images.clear()
        ending = record_of(job)
        output = ending.pop("output")
        for kept in ("id", "endpoint", "seed", "base_url", "created", "status", "started", "finished", "logs"):
            ending.pop(kept)
        ending["output"] = output if job.keep_output else None  # a sync_mode output goes back to its ingress only
        record = ray.get(self.registry.complete.remote(request_id, ending))
        if record is not None and record.get("error") is None and not job.keep_output:
            record = dict(record, output=output)
        return record

    def _watch(self, request_id: str, stop: threading.Event, ended: threading.Event) -> None:
        while not ended.wait(STOP_POLL_S):
            if ray.get(self.registry.stop_requested.remote(request_id)):
                stop.set()
                return

    def _say(self, job: Job, message: str) -> None:
        self.registry.log.remote(job.id, log_entry(message))  # not awaited: the run goes on

    def _run(self, job: Job, prompt: dict, stop: threading.Event) -> None:
        problems = validate(prompt, self.classes)
        if problems:
            job.complete(error=f"this server cannot run the workflow: {'; '.join(problems)}",
                         error_type="workflow_refused")
            return
        if self.memory is not None:
            problem = memory_problem(prompt, self.device, self.image_size, self.memory, SERVER_ADVICE)
            if problem is not None:
                job.complete(error=problem, error_type="request_too_large")
                return

        def on_step(step: int, total: int, x0: torch.Tensor) -> None:
            self._say(job, f"step {step}/{total}")

        run_job(job, CheckedPrompt(prompt, self.classes), self.output_dir, stop, on_step,
                lambda message: self._say(job, message))

    def image_size(self, value: object) -> tuple[int, int] | None:
        """The size Krea Encode Image makes of a request's image (what the pre-flight needs)."""
        image = self.images.get(value) if isinstance(value, str) else None
        return None if image is None else (nearest_multiple(image.width), nearest_multiple(image.height))
