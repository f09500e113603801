"""fal requests inside ComfyUI -> prompts on ComfyUI's own queue, served under /fal of ComfyUI's server.

A request becomes the shipped API workflow, validated by ComfyUI's validate_prompt and put on its PromptQueue as
POST /prompt does: the request id IS the prompt id, so fal jobs show in ComfyUI's queue and history. The queue
position comes from that queue, the end from its history; cancel removes a waiting prompt or interrupts the
running one. Sampler steps reach the logs as they happen (a listener of the host's progress callback); node starts
are read off ComfyUI's progress registry every WATCH_S. ComfyUI's --tls-keyfile/--tls-certfile give https (a key
others can read is warned about: ComfyUI loads it, the pack cannot refuse it).

The protocol's limits (fal_api) hold here as in `serve`, set by environment variables (fal_api/settings.py). What
only the server itself could bound is ComfyUI's: its connections (how many, how long one may sit idle or send its
headers) and what happens on SIGTERM (ComfyUI installs no handler: the process ends at once, and fal requests still
waiting have no record afterwards).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import execution  # type: ignore[import-not-found]
import folder_paths  # type: ignore[import-not-found]
import latent_preview  # type: ignore[import-not-found]
import nodes as comfy_nodes  # type: ignore[import-not-found]  (ComfyUI's nodes module, not the pack's)
import torch
from comfy import latent_formats  # type: ignore[import-not-found]
from comfy_execution.progress import get_progress_state  # type: ignore[import-not-found]

from ...fal_api.backend import WorkflowRefused
from ...fal_api.image_input import InputImage
from ...fal_api.jobs import CANCELLED, Job
from ...fal_api.routes import FalService, add_fal_routes
from ...fal_api.settings import API_KEY_ENV, ServiceSettings
from ...fal_api.streaming import preview_entry
from ...fal_api.tls_key import key_exposure
from ...fal_api.workflow import finish
from .comfyui_errors import refusal_text
from .folders import model_name_problem

log = logging.getLogger(__name__)

PREFIX = "/fal"
WATCH_S = 0.1


class ComfyQueueBackend:
    """Puts fal workflows on ComfyUI's PromptQueue and follows them there."""

    def __init__(self, server, uploads_folder: Path) -> None:
        self.server = server
        self.output_dir = Path(folder_paths.get_output_directory())
        self.input_dir = Path(folder_paths.get_input_directory())
        self.uploads_folder = uploads_folder  # inside input/, where ComfyUI's LoadImage reads the request images
        self._jobs: dict[str, tuple[Job, dict]] = {}
        self._seen: dict[str, set[str]] = {}  # request id -> the nodes whose start was logged
        self._watcher: asyncio.Task | None = None
        self._previewer = None  # ComfyUI's latent previewer, made at the first streamed request's first step

    def model_folder(self, folder: str) -> Path:
        return Path(folder_paths.get_folder_paths(folder)[0])

    def model_file(self, folder: str, name: str) -> Path | None:
        problem = model_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        found = folder_paths.get_full_path(folder, name)
        return Path(found) if found is not None else None

    def image_reference(self, job: Job, image: InputImage) -> str:
        """ComfyUI's own LoadImage reads files: the bytes as a file in input/, removed when the job ends."""
        path = image.write(self.uploads_folder)
        job.on_end(lambda: path.unlink(missing_ok=True))
        return path.resolve().relative_to(self.input_dir.resolve()).as_posix()  # LoadImage reads input/<this>

    async def submit(self, job: Job, prompt: dict) -> None:
        valid = await execution.validate_prompt(job.id, prompt, None)
        if not valid[0]:
            raise WorkflowRefused(refusal_text(valid[1], valid[3]))
        number = self.server.number
        self.server.number += 1
        self._jobs[job.id] = (job, prompt)
        self.server.prompt_queue.put((number, job.id, prompt, {}, valid[2]))
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def position(self, job: Job) -> int | None:
        running, queued = self.server.prompt_queue.get_current_queue_volatile()
        # ComfyUI's worker pops the smallest item: by number, then by prompt id (a client's own number can tie).
        waiting = [item[1] for item in sorted(queued, key=lambda item: item[:2])]
        return waiting.index(job.id) if job.id in waiting else None

    def cancel(self, job: Job) -> None:
        queue = self.server.prompt_queue
        if queue.delete_queue_item(lambda item: item[1] == job.id):
            job.complete(error="the request was cancelled while it waited", error_type=CANCELLED)
            self._jobs.pop(job.id, None)
            return
        running, _ = queue.get_current_queue_volatile()
        if any(item[1] == job.id for item in running):
            comfy_nodes.interrupt_processing()

    async def _watch(self) -> None:
        """Until no fal job is left: their progress into logs, their end from ComfyUI's history."""
        while self._jobs:
            for request_id, (job, prompt) in list(self._jobs.items()):
                try:
                    await self._follow(job, prompt)
                except Exception as err:  # one bad record must not stop the others being followed
                    log.exception("fal request %s", request_id)
                    job.complete(error=f"{type(err).__name__}: {err}", error_type="internal_error")
                if job.done:
                    self._jobs.pop(request_id, None)
                    self._seen.pop(request_id, None)
            await asyncio.sleep(WATCH_S)

    async def _follow(self, job: Job, prompt: dict) -> None:
        history = self.server.prompt_queue.get_history(prompt_id=job.id).get(job.id)
        if history is not None:
            job.start()
            await asyncio.get_running_loop().run_in_executor(None, self._end, job, prompt, history)
            return
        running, _ = self.server.prompt_queue.get_current_queue_volatile()
        if not any(item[1] == job.id for item in running):
            return
        job.start()
        registry = get_progress_state()
        if registry.prompt_id != job.id:
            return
        seen = self._seen.setdefault(job.id, set())
        for node_id in list(registry.nodes):  # nodes seen started (a node quicker than WATCH_S may be missed)
            if node_id not in seen:
                seen.add(node_id)
                job.log(f"running {prompt.get(node_id, {}).get('class_type', 'node')} (node {node_id})")

    def on_step(self, prompt_id: str, step: int, total: int, x0: torch.Tensor) -> None:
        """Every sampler step of a fal request, from ComfyUI's worker thread (ComfyHost.add_step_listener); a
        streamed request gets a preview of x0 from ComfyUI's latent previewer (TAESD when the server is set up
        for it, else its linear latent-to-RGB map for FLUX)."""
        entry = self._jobs.get(prompt_id)
        if entry is None:
            return
        job = entry[0]
        job.start()
        job.log(f"step {step}/{total}")
        if job.wants_previews and step < total:
            if self._previewer is None:
                flux = latent_formats.Flux()
                self._previewer = latent_preview.get_previewer(x0.device, flux) or \
                    latent_preview.Latent2RGBPreviewer(flux.latent_rgb_factors, flux.latent_rgb_factors_bias)
            job.set_preview(preview_entry(self._previewer.decode_latent_to_preview(x0)))

    def _end(self, job: Job, prompt: dict, history: dict) -> None:
        status = history.get("status") or {}
        messages = dict((event, data) for event, data in status.get("messages", []))
        start = messages.get("execution_start", {}).get("timestamp")
        end_event = next((e for e in ("execution_success", "execution_error", "execution_interrupted")
                          if e in messages), None)
        end = messages.get(end_event, {}).get("timestamp") if end_event else None
        inference_s = (end - start) / 1000 if start and end else 0.0
        if status.get("status_str") == "success":
            finish(job, prompt, history.get("outputs", {}), self.output_dir, inference_s)
            job.log("done")
        elif end_event == "execution_interrupted":
            job.complete(error="the request was cancelled while it ran", error_type=CANCELLED)
        else:
            error = messages.get("execution_error", {})
            job.complete(error=f"{error.get('node_type', 'a node')}: {error.get('exception_message', 'failed')}",
                         error_type=error.get("exception_type", "execution_error"))


def register_fal_routes(add_step_listener: Callable[[Callable[[str, int, int, torch.Tensor], None]], None]
                        ) -> FalService | None:
    """The protocol under /fal of the running ComfyUI server (None when there is no server: tests, scripts);
    `add_step_listener` is the ComfyUI host's, which tells the backend of every sampler step."""
    try:
        from server import PromptServer  # type: ignore[import-not-found]
    except ImportError:
        return None
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return None
    try:
        settings = ServiceSettings.from_environment()
    except ValueError as err:  # the nodes keep working; the protocol stays off until the setting is fixed
        log.error("fal protocol not served under %s: %s", PREFIX, err)
        return None
    uploads_folder = Path(folder_paths.get_input_directory()) / "fal-uploads"
    backend = ComfyQueueBackend(server, uploads_folder)
    service = FalService.create(backend, uploads_folder, settings, prefix=PREFIX)
    add_fal_routes(server.routes, service)
    add_step_listener(backend.on_step)
    log.info(startup_line(settings))
    warn_about_tls_key()
    return service


def startup_line(settings: ServiceSettings) -> str:
    """What ComfyUI's log says once at start-up about the routes, for people who never heard of fal too."""
    key = (f"it requires the key set in {API_KEY_ENV}" if settings.api_key else
           f"it accepts any key until {API_KEY_ENV} is set")
    return (f"Krea node pack: fal's image API (fal-ai/flux/krea) is also served by this ComfyUI under {PREFIX}, for "
            f"programs written for fal's clients; {key} (the pack's docs/fal-server.md).")


def warn_about_tls_key() -> None:
    from comfy.cli_args import args  # type: ignore[import-not-found]

    exposure = key_exposure(Path(args.tls_keyfile)) if getattr(args, "tls_keyfile", None) else None
    if exposure is not None:
        log.warning("fal: %s", exposure[1])
