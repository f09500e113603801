"""An API prompt -> a run on a running ComfyUI server (`run --server URL`): queued over HTTP, followed on its
websocket, its images downloaded through /view into the same sub-folders of --output as the server saved them in.

Input images are uploaded first (POST /upload/image). A 400 answer's node_errors become one line per problem
(WorkflowError: exit code 2, as a bad value locally); any other answer (a proxy's page) is shown as it came.
While it runs, stderr shows each node as it starts, the cached ones, and a progress bar per node and step. Ctrl-C
interrupts the server's job (POST /interrupt with the prompt id) and takes it off the queue (POST /queue delete)
before the KeyboardInterrupt goes on (exit 130).
Downloads never replace a file: a taken name gets the next free counter. A run with no history entry after 10 s is
a RunFailed, not a success with nothing saved.
"""
from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..nodes.host import REPORT_EVENT
from ..nodes.host.comfyui_errors import node_problems
from .runner import WorkflowError
from .terminal import TERMINAL, Terminal


class RunFailed(RuntimeError):
    """The server ran the prompt and a node failed (exit code 1)."""


@dataclass
class ServerRun:
    url: str  # http(s)://host:port[/path]
    headers: dict[str, str] = field(default_factory=dict)
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prompt_id: str | None = None

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.url.startswith("https") else "ws"
        return f"{scheme}{self.url[self.url.index(':'):]}/ws?clientId={self.client_id}"


def json_object(text: str) -> dict | None:
    """The JSON object `text` holds, or None (not JSON, or not an object: e.g. a proxy's error page)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def node_error_lines(answer: dict, prompt: Mapping[str, dict]) -> list[str]:
    """A 400 answer of POST /prompt as one readable line per problem (each once, under the input it is about)."""
    lines = []
    error = answer.get("error") or {}
    for problem in node_problems(answer.get("node_errors") or {}):
        title = prompt.get(problem.node_id, {}).get("_meta", {}).get("title") or problem.class_type
        lines.append(f"node {problem.node_id} ({title}): {problem.text}")
    if not lines and error:
        message = error.get("message", "the server refused the workflow")
        lines.append(f"{message}: {error.get('details', '')}".rstrip(": "))
    return lines or ["the server refused the workflow"]


class Progress:
    """Lines on stderr: node starts, cached nodes, one bar per node that reports steps."""

    def __init__(self, prompt: Mapping[str, dict], terminal: Terminal = TERMINAL) -> None:
        self.titles = {k: v.get("_meta", {}).get("title") or v.get("class_type", k) for k, v in prompt.items()}
        self.terminal = terminal
        self.reports: list[tuple[str, str]] = []  # (node id, text) of the pack's nodes' reports

    def message(self, kind: str, data: dict) -> None:
        if kind == REPORT_EVENT and isinstance(data.get("text"), str):
            self.reports.append((str(data.get("node")), data["text"]))
        elif kind == "execution_cached" and data.get("nodes"):
            self.terminal.line("  cached: " + ", ".join(self.titles.get(n, n) for n in data["nodes"]))
        elif kind == "executing" and data.get("node") is not None:
            self.terminal.line(f"  {self.titles.get(data['node'], data['node'])}")
        elif kind == "progress":
            self.terminal.bar("    ", int(data.get("value", 0)), int(data.get("max", 1)))


def free_name(folder: Path, name: str) -> Path:
    stem, dot, suffix = Path(name).name.rpartition(".")
    stem, suffix = (stem, "." + suffix) if dot else (suffix, "")
    candidate, counter = folder / f"{stem}{suffix}", 1
    while candidate.exists():
        candidate, counter = folder / f"{stem}_{counter}{suffix}", counter + 1
    return candidate


def write_new(folder: Path, name: str, data: bytes) -> Path:
    """The bytes under `name` in `folder`, or under the next free variant: written to a temporary file and
    linked into place, so no existing file is replaced and no half-written file is left."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{uuid.uuid4().hex}.part"
    partial.write_bytes(data)
    try:
        while True:
            target = free_name(folder, name)
            try:
                os.link(partial, target)
                return target
            except FileExistsError:
                continue
    finally:
        partial.unlink(missing_ok=True)


def inside(output: Path, subfolder: object) -> Path:
    """output/subfolder, as the server named it; a subfolder that would leave `output` is refused."""
    folder = output / str(subfolder or "")
    if folder.resolve() != output.resolve() and output.resolve() not in folder.resolve().parents:
        raise RunFailed(f"the server named an image sub-folder outside the output folder: {subfolder!r}")
    return folder


async def run_on_server(prompt: dict, run: ServerRun, output: Path, images: Mapping[str, Path],
                        embedded: Callable[[dict], dict | None] | None = None) -> tuple[list[Path],
                                                                                        list[tuple[str, str]]]:
    """Queue `prompt` (uploading `images`: LoadImage or LoadImageMask node id -> local file), follow it, download
    its images into the same sub-folders of `output` as the server saved them in. `embedded(final prompt)`: what
    the saved images embed beside the prompt (ComfyUI's extra_pnginfo, e.g. the UI workflow). Returns the files
    written and the nodes' reports ((node id, text), the pack's krea.report messages)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(headers=run.headers, timeout=timeout) as session:
        for node_id, path in images.items():
            form = aiohttp.FormData()
            form.add_field("image", path.read_bytes(), filename=path.name)
            form.add_field("subfolder", "krea-cli")
            form.add_field("type", "input")
            async with session.post(f"{run.url}/upload/image", data=form) as answer:
                if answer.status != 200:
                    raise WorkflowError(f"uploading {path} to the server failed: HTTP {answer.status} "
                                        f"{(await answer.text())[:300]}")
                uploaded = await answer.json()
            name = uploaded["name"]
            prompt[node_id]["inputs"]["image"] = f"{uploaded['subfolder']}/{name}" if uploaded.get("subfolder") \
                else name
        extra = embedded(prompt) if embedded is not None else None
        body = {"prompt": prompt, "client_id": run.client_id, **({"extra_data": {"extra_pnginfo": extra}} if extra
                                                                 else {})}
        async with session.ws_connect(run.ws_url, heartbeat=30) as socket:
            async with session.post(f"{run.url}/prompt", json=body) as answer:
                text = await answer.text()
                body = json_object(text)
                if answer.status == 400 and body is not None:
                    raise WorkflowError("the server refused the workflow:\n  " +
                                        "\n  ".join(node_error_lines(body, prompt)))
                if answer.status != 200 or body is None or "prompt_id" not in body:
                    # e.g. a proxy's error page: said as it came
                    raise WorkflowError(f"POST /prompt: HTTP {answer.status} {text[:300]}")
                run.prompt_id = body["prompt_id"]
            progress = Progress(prompt)
            try:
                await follow(socket, run, progress)
            except asyncio.CancelledError:  # Ctrl-C: stop the server's job, then let the interrupt go on
                await stop_on_server(session, run)
                raise
        history: dict = {}
        for _ in range(100):  # written by the time the end is sent; a proxy may reorder, so look again a while
            async with session.get(f"{run.url}/history/{run.prompt_id}") as answer:
                history = (await answer.json()).get(run.prompt_id, {})
            if history:
                break
            await asyncio.sleep(0.1)
        else:
            raise RunFailed(f"the run ended but the server has no record of it (GET /history/{run.prompt_id} "
                            "stayed empty for 10 s): its images are in the server's output folder")
        outputs = history.get("outputs", {})
        written = []
        for ui in outputs.values():
            for image in ui.get("images", []):
                if image.get("type") != "output":
                    continue
                query = {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": "output"}
                async with session.get(f"{run.url}/view", params=query) as answer:
                    if answer.status != 200:
                        raise RunFailed(f"downloading {image['filename']} failed: HTTP {answer.status}")
                    data = await answer.read()
                written.append(write_new(inside(output, image.get("subfolder")), image["filename"], data))
        return written, progress.reports


async def follow(socket, run: ServerRun, progress: Progress) -> None:
    """Websocket messages of our prompt until it ends; a failure raises RunFailed."""
    import aiohttp

    async for message in socket:
        if message.type != aiohttp.WSMsgType.TEXT:
            continue  # previews (binary frames)
        event = json.loads(message.data)
        kind, data = event.get("type"), event.get("data") or {}
        if data.get("prompt_id") not in (None, run.prompt_id):
            continue
        progress.message(kind, data)
        if kind == "execution_error":
            raise RunFailed(f"{data.get('node_type', 'a node')} (node {data.get('node_id')}) failed on the "
                            f"server: {data.get('exception_type', '')}: {data.get('exception_message', '')}".rstrip())
        if kind == "execution_interrupted":
            raise RunFailed("the run was interrupted on the server")
        # The end: ComfyUI sends this after it wrote the history (execution_success comes before that).
        if kind == "executing" and data.get("node") is None and data.get("prompt_id") == run.prompt_id:
            return
    raise RunFailed("the server closed the connection before the run ended")


async def stop_on_server(session, run: ServerRun) -> None:
    """Interrupt our prompt if it runs, remove it if it waits (ComfyUI's own endpoints)."""
    if run.prompt_id is None:
        return
    for path, body in (("/interrupt", {"prompt_id": run.prompt_id}), ("/queue", {"delete": [run.prompt_id]})):
        try:
            async with session.post(f"{run.url}{path}", json=body) as answer:
                await answer.read()
        except OSError:
            pass  # the server is gone: nothing left to stop
