"""Queued fal requests -> workflow runs on the in-process runner, one at a time, in a worker thread (`serve`).

The aiohttp event loop takes requests; this thread runs them in order. A queued request that is cancelled is
ended at once; a running one is stopped through the host's interrupt event before the next transformer block.
Progress reaches the request's logs as "step k/N" lines, each node's start as "running <node type>". A request's
input image reaches the workflow's LoadImage as the protocol decoded it, and its workflow is validated once, when
it is submitted.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from ..fal_api.backend import WorkflowRefused
from ..fal_api.image_input import InputImage
from ..fal_api.jobs import CANCELLED, Job
from ..fal_api.workflow import finish
from ..nodes.host import Interrupted, standalone_host
from .node_classes import PACK_CLASSES, decoded_image_loader
from .runner import CheckedPrompt, WorkflowError, run, validate

log = logging.getLogger(__name__)


class RunnerBackend:
    """One worker thread over a FIFO of (job, workflow)."""

    def __init__(self, output_dir: Path, model_name: str | None = None) -> None:
        self.output_dir = output_dir
        self.model_name = model_name  # the transformer file every request runs (None: the workflow's own)
        self.interrupt = threading.Event()
        self._images: dict[str, Image.Image] = {}  # LoadImage's value -> the request's decoded image
        self._names = itertools.count()
        self.classes = {**PACK_CLASSES, "LoadImage": decoded_image_loader(self._images)}
        self._waiting: queue.Queue[tuple[Job, CheckedPrompt] | None] = queue.Queue()
        self._order: list[str] = []  # ids of waiting jobs, oldest first
        self._running: Job | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="krea-fal-runner", daemon=True)
        self._thread.start()

    def image_reference(self, job: Job, image: InputImage) -> str:
        name = f"fal-input-{next(self._names)}"
        self._images[name] = image.image
        job.on_end(lambda: self._images.pop(name, None))
        return name

    async def submit(self, job: Job, prompt: dict) -> None:
        if self.model_name is not None:
            for node in prompt.values():
                if node.get("class_type") == "KreaModelLoader":
                    node["inputs"]["model_name"] = self.model_name
        problems = validate(prompt, self.classes)  # the models are there and of the right kind, before it waits
        if problems:
            raise WorkflowRefused("; ".join(problems))
        with self._lock:
            self._order.append(job.id)
        self._waiting.put((job, CheckedPrompt(prompt, self.classes)))

    def position(self, job: Job) -> int | None:
        with self._lock:
            return self._order.index(job.id) if job.id in self._order else None

    def cancel(self, job: Job) -> None:
        with self._lock:
            if job.id in self._order:
                self._order.remove(job.id)
                job.complete(error="the request was cancelled while it waited", error_type=CANCELLED)
                return
            running = self._running is job
        if running:
            self.interrupt.set()

    def close(self) -> None:
        self._waiting.put(None)
        self._thread.join(timeout=60)

    def _work(self) -> None:
        while True:
            item = self._waiting.get()
            if item is None:
                return
            job, prompt = item
            with self._lock:
                if job.id not in self._order:  # cancelled while it waited
                    continue
                self._order.remove(job.id)
                self._running = job
                self.interrupt.clear()
            try:
                self._run(job, prompt)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job, prompt: CheckedPrompt) -> None:
        job.start()

        def on_step(step: int, total: int, x0: torch.Tensor) -> None:
            job.log(f"step {step}/{total}")

        standalone_host().configure(output_dir=self.output_dir, progress=on_step, interrupt=self.interrupt)
        started = time.perf_counter()
        try:
            uis = run(prompt, on_node=lambda node_id, kind: job.log(f"running {kind} (node {node_id})"))
            finish(job, prompt.prompt, uis, self.output_dir, time.perf_counter() - started)
            job.log("done")
        except Interrupted:
            job.complete(error="the request was cancelled while it ran", error_type=CANCELLED)
        except (WorkflowError, ValueError, OSError) as err:
            log.warning("fal request %s failed: %s", job.id, err)
            job.complete(error=str(err), error_type=type(err).__name__)
        except Exception as err:  # the worker must outlive any one request
            log.exception("fal request %s failed", job.id)
            job.complete(error=f"{type(err).__name__}: {err}", error_type="internal_error")
