"""Queued fal requests -> workflow runs on the in-process runner, one at a time, in a worker thread (`serve`).

The aiohttp event loop takes requests; this thread runs them in order. A queued request that is cancelled is
ended at once; a running one is stopped through the host's interrupt event before the next transformer or
autoencoder block. Progress reaches the request's logs as "step k/N" lines, each node's start as "running <node
type>"; a streamed request also gets a preview per step (previews.py). A request's input image (and mask) reaches
the workflow's LoadImage (LoadImageMask) as the protocol decoded it, and its workflow is validated once, when it
is submitted, together with the command line's memory pre-flight (preflight.py) against what was free when the
server started. `shutdown` ends every waiting request as cancelled and interrupts the running one.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from ..fal_api.backend import RequestTooLarge, WorkflowRefused
from ..fal_api.image_input import InputImage
from ..fal_api.jobs import CANCELLED, Job
from ..fal_api.streaming import preview_entry
from ..fal_api.workflow import finish
from ..nodes.host import Interrupted, standalone_host
from ..nodes.host.folders import model_name_problem
from ..sampling.parameters import nearest_multiple
from .node_classes import PACK_CLASSES, decoded_image_loader, decoded_mask_loader
from .preflight import available_memory, memory_problem
from .previews import preview_maker
from .runner import CheckedPrompt, WorkflowError, run, validate

log = logging.getLogger(__name__)

SERVER_ADVICE = "Ask for fewer or smaller images."


def model_folder(folder: str) -> Path:
    """The folder of this server's models of one kind (where fal's LoRA endpoints cache fetched files)."""
    return standalone_host().model_search_paths(folder)[0]


def model_file(folder: str, name: str) -> Path | None:
    """A model name of a request -> its file in this server's models (None: no such file); ValueError when the
    name leaves the folder."""
    problem = model_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return standalone_host().find_model(folder, name)


def use_model(prompt: dict, model_name: str | None) -> None:
    """`serve --model`: every request's Krea Model Loader reads that transformer file (None: the workflow's own)."""
    if model_name is not None:
        for node in prompt.values():
            if node.get("class_type") == "KreaModelLoader":
                node["inputs"]["model_name"] = model_name


class RunnerBackend:
    """One worker thread over a FIFO of (job, workflow)."""

    def __init__(self, output_dir: Path, model_name: str | None = None, memory_check: bool = True) -> None:
        self.output_dir = output_dir
        self.model_name = model_name  # the transformer file every request runs (None: the workflow's own)
        self.interrupt = threading.Event()
        self._images: dict[str, Image.Image] = {}  # LoadImage's value -> the request's decoded image
        self._names = itertools.count()
        self.classes = {**PACK_CLASSES, "LoadImage": decoded_image_loader(self._images),
                        "LoadImageMask": decoded_mask_loader(self._images)}
        self._waiting: queue.Queue[tuple[Job, CheckedPrompt] | None] = queue.Queue()
        self._order: list[Job] = []  # waiting jobs, oldest first
        self._running: Job | None = None
        self._closed = False
        self._lock = threading.Lock()
        # What one run may use: measured now, before any model is loaded (the models stay loaded between runs).
        self.device = standalone_host().torch_device()
        free, where = available_memory(self.device)
        self.memory = (free, f"{where} (free when the server started)") if memory_check else None
        self._thread = threading.Thread(target=self._work, name="krea-fal-runner", daemon=True)
        self._thread.start()

    def model_folder(self, folder: str) -> Path:
        return model_folder(folder)

    def model_file(self, folder: str, name: str) -> Path | None:
        return model_file(folder, name)

    def image_reference(self, job: Job, image: InputImage) -> str:
        name = f"fal-input-{next(self._names)}"
        self._images[name] = image.image
        job.on_end(lambda: self._images.pop(name, None))
        return name

    def image_size(self, value: object) -> tuple[int, int] | None:
        """The size Krea Encode Image makes of a request's image (what the pre-flight needs)."""
        image = self._images.get(value) if isinstance(value, str) else None
        return None if image is None else (nearest_multiple(image.width), nearest_multiple(image.height))

    async def submit(self, job: Job, prompt: dict) -> None:
        use_model(prompt, self.model_name)
        problems = validate(prompt, self.classes)  # the models are there and of the right kind, before it waits
        if problems:
            raise WorkflowRefused("; ".join(problems))
        if self.memory is not None:
            problem = memory_problem(prompt, self.device, self.image_size, self.memory, SERVER_ADVICE)
            if problem is not None:
                raise RequestTooLarge(problem)
        with self._lock:
            if self._closed:
                raise WorkflowRefused("the server is shutting down")
            self._order.append(job)
        self._waiting.put((job, CheckedPrompt(prompt, self.classes)))

    def position(self, job: Job) -> int | None:
        with self._lock:
            return next((index for index, waiting in enumerate(self._order) if waiting is job), None)

    def cancel(self, job: Job) -> None:
        with self._lock:
            if self._take_waiting(job):
                job.complete(error="the request was cancelled while it waited", error_type=CANCELLED)
                return
            running = self._running is job
        if running:
            self.interrupt.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self) -> None:
        """No more runs: every waiting request ends cancelled (its record says so), the running one is interrupted
        before its next block."""
        with self._lock:
            self._closed = True
            waiting, self._order = self._order, []
            running = self._running
        for job in waiting:
            job.complete(error="the server shut down before the request ran", error_type=CANCELLED)
        if running is not None:
            self.interrupt.set()

    def _take_waiting(self, job: Job) -> bool:
        """Remove `job` from the waiting list (by identity; the caller holds the lock); False when it is not there."""
        kept = [waiting for waiting in self._order if waiting is not job]
        found = len(kept) != len(self._order)
        self._order = kept
        return found

    def close(self, timeout_s: float = 60.0) -> bool:
        """Let the worker finish and stop; False when it is still running after `timeout_s`."""
        self._waiting.put(None)
        self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while True:
            item = self._waiting.get()
            if item is None:
                return
            job, prompt = item
            with self._lock:
                if not self._take_waiting(job):  # cancelled while it waited
                    continue
                self._running = job
                self.interrupt.clear()
            try:
                self._run(job, prompt)
            finally:
                with self._lock:
                    self._running = None

    def _run(self, job: Job, prompt: CheckedPrompt) -> None:
        job.start()
        try:
            preview = preview_maker(prompt.prompt) if job.wants_previews else None
        except Exception as err:  # no VAE to preview with: the stream still ends with the result
            log.warning("fal request %s: no previews (%s)", job.id, err)
            preview = None

        def on_step(step: int, total: int, x0: torch.Tensor) -> None:
            job.log(f"step {step}/{total}")
            image = preview(x0) if preview is not None and step < total else None
            if image is not None:
                job.set_preview(preview_entry(image))

        run_job(job, prompt, self.output_dir, self.interrupt, on_step, job.log)


def run_job(job: Job, prompt: CheckedPrompt, output_dir: Path, interrupt: threading.Event,
            on_step: Callable[[int, int, torch.Tensor], None], say: Callable[[str], None]) -> None:
    """Run a started job's checked workflow on the standalone host and end the job: its output, or the error it
    raised (cancelled, refused by a node, or internal; a server must outlive any one request). `say` adds a line to
    the job's logs (each node's start, then "done")."""
    standalone_host().configure(output_dir=output_dir, progress=on_step, interrupt=interrupt)
    started = time.perf_counter()
    try:
        uis = run(prompt, on_node=lambda node_id, kind: say(f"running {kind} (node {node_id})"))
        finish(job, prompt.prompt, uis, output_dir, time.perf_counter() - started)
        say("done")
    except Interrupted:
        job.complete(error="the request was cancelled while it ran", error_type=CANCELLED)
    except (WorkflowError, ValueError, OSError) as err:
        log.warning("fal request %s failed: %s", job.id, err)
        job.complete(error=str(err), error_type=type(err).__name__)
    except Exception as err:
        log.exception("fal request %s failed", job.id)
        job.complete(error=f"{type(err).__name__}: {err}", error_type="internal_error")
