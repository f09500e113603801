"""What runs the workflows behind the protocol: the Backend interface the routes use, implemented by the
standalone server's runner (standalone/runner_backend.py) and by ComfyUI's own queue (nodes/host/fal_queue.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from .image_input import InputImage
from .jobs import Job


class WorkflowRefused(Exception):
    """The server cannot run the workflow (its models are missing, ...): the operator's problem, not the input's."""


class RequestTooLarge(Exception):
    """The request would not fit in the memory this server has (the message gives the numbers): refused with a 422
    on the field that sets its size, before it is queued."""


class Backend(Protocol):
    output_dir: Path  # where the workflows' images are saved (results are served from there)

    def model_folder(self, folder: str) -> Path:
        """The (first) folder of a model kind ("loras"): where LoRAs fetched for requests are cached."""
        ...

    def model_file(self, folder: str, name: str) -> Path | None:
        """The file a model name of `folder` names, None when there is none; ValueError (saying why) for a name that
        would leave the folder."""
        ...

    def image_reference(self, job: Job, image: InputImage) -> str:
        """Hand `job`'s input image to the workflow: the value of its LoadImage (or LoadImageMask) node's `image`
        input. What it takes to do so (a file, a held image) is given back when the job ends (`job.on_end`)."""
        ...

    async def submit(self, job: Job, prompt: dict) -> None:
        """Validate the API `prompt` and queue it; raises WorkflowRefused, or RequestTooLarge when the backend can
        tell that its run would not fit in memory."""
        ...

    def position(self, job: Job) -> int | None:
        """Place among the waiting jobs (0: next); None when it does not wait."""
        ...

    def cancel(self, job: Job) -> None:
        """Queued: removed and ended now; running: stopped within a step."""
        ...
