"""A stand-in for a running ComfyUI 0.3.64 server, in-process on aiohttp's TestServer, for tests of `run --server`
(standalone/remote.py): its routes and websocket messages have the shapes of ComfyUI's server.py, execution.py and
main.py; what a queued prompt does (which nodes run, their steps, the images they save, a failure) is a `Plan` the
test gives, since no nodes run here. Below the server: `run`, which runs run_on_server against it, and the
image-to-image workflow's usual plan (`saving`).

Routes: GET /object_info (the node types' definitions), GET /ws?clientId= (a 'status' message first),
POST /upload/image (a taken name gets " (1)", an identical file is reused), POST /prompt (ComfyUI's refusals of
a node type it lacks, a node without class_type, a prompt without outputs; or the test's `refusal`),
GET /history/{id} ({} until the run is recorded), GET /view (ComfyUI's checks: 400 for '..' or an absolute name,
403 for a sub-folder outside, 404 for a missing file), POST /interrupt,
POST /queue. A run sends, to the queuing client's socket: execution_start, execution_cached, then per node
executing, progress per step (and a binary preview frame), executed, with progress_state (every node's state)
at each start, step and finish, then execution_success or execution_error /
execution_interrupted; then the history is recorded, 'status' goes to every socket, and executing with node None
ends it, as ComfyUI's prompt worker does.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from comfyui_krea.standalone.remote import ServerRun, run_on_server

OUTPUT_TYPES = {"KreaSaveImage", "SaveImage", "PreviewImage"}  # OUTPUT_NODE = True among the types used here


@dataclass
class NodeRun:
    """One node of a run: its steps (progress messages), the images it saves ((subfolder, filename, bytes, type)),
    more of its ui output,
    the pack's report text, or a failure ((exception_type, exception_message))."""
    node: str
    steps: int = 0
    images: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    report: str | None = None
    error: tuple[str, str] | None = None
    ui: dict = field(default_factory=dict)  # more of its ui output (e.g. PreviewAny's {"text": [...]})


@dataclass
class Plan:
    nodes: list[NodeRun] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    hold_at_step: int | None = None  # the run waits there until interrupted (or released)
    history_late: int = 0  # GET /history answers {} this many times after the run was recorded (a proxy's cache)
    close_at_step: int | None = None  # the server goes away there: every socket closed


class StandInComfyUI:
    def __init__(self, root: Path, node_types: set[str], max_upload_size: int = 100 * 1024 * 1024,
                 definitions: dict[str, dict] | None = None) -> None:
        self.definitions = definitions  # GET /object_info's answer; None: a bare entry per node type
        self.dirs = {kind: root / kind for kind in ("input", "output", "temp")}
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.node_types = node_types
        self.plan = Plan()
        self.refusal: tuple[dict, dict] | None = None  # (error, node_errors) of a 400 answer, as validate_prompt's
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.prompts: list[dict] = []  # the bodies of POST /prompt
        self.stops: list[tuple[str, dict]] = []  # (path, body) of POST /interrupt and POST /queue
        self.views: list[dict] = []  # the queries of GET /view
        self.uploads: list[dict] = []  # the form fields of POST /upload/image (the file as its name and bytes)
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers) of every request
        self.proxy_answer: tuple[int, str] | None = None  # (status, html) a proxy in front answers POST /prompt
        self.history: dict[str, dict] = {}
        self.history_asked = 0
        self.queue: list[str] = []
        self.running: str | None = None
        self.interrupt = asyncio.Event()
        self.resume = asyncio.Event()  # lets a held run go on (POST /interrupt sets it too)
        self.holding = asyncio.Event()  # set once a run waits at hold_at_step
        self.number = 0
        self.max_upload_size = max_upload_size
        self.flat_uploads = False  # True: keeps every upload in input/ itself and answers subfolder "" (a server
        # without upload sub-folders)

    def application(self) -> web.Application:
        """The routes, in an application of its own for each event loop that serves them."""
        app = web.Application(client_max_size=self.max_upload_size, middlewares=[self.record])
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/object_info", self.object_info)
        app.router.add_post("/upload/image", self.upload)
        app.router.add_post("/prompt", self.post_prompt)
        app.router.add_get("/history/{prompt_id}", self.get_history)
        app.router.add_get("/view", self.view)
        app.router.add_post("/interrupt", self.post_interrupt)
        app.router.add_post("/queue", self.post_queue)
        return app

    @web.middleware
    async def record(self, request: web.Request, handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.headers)))
        if self.proxy_answer is not None and request.path == "/prompt":  # a reverse proxy's own page
            return web.Response(status=self.proxy_answer[0], text=self.proxy_answer[1], content_type="text/html")
        return await handler(request)

    async def object_info(self, request: web.Request) -> web.Response:
        bare = {name: {"input": {}, "input_order": {}, "output": [], "name": name} for name in self.node_types}
        return web.json_response(self.definitions if self.definitions is not None else bare)

    # -- the websocket ------------------------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "") or uuid.uuid4().hex
        self.sockets[sid] = ws
        await ws.send_json({"type": "status", "data": {"status": self.queue_info(), "sid": sid}})
        async for message in ws:
            if message.type == WSMsgType.ERROR:
                break
        self.sockets.pop(sid, None)
        return ws

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": len(self.queue) + (self.running is not None)}}

    async def send(self, event: str, data: dict, sid: str | None) -> None:
        """ComfyUI's send_json: to that client's socket, or to every socket when sid is None."""
        targets = list(self.sockets.values()) if sid is None else [self.sockets[sid]] if sid in self.sockets else []
        for ws in targets:
            await ws.send_json({"type": event, "data": data})

    # -- uploads and downloads ----------------------------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        if image is None or not getattr(image, "file", None) or not image.filename:
            return web.Response(status=400)
        data = image.file.read()
        kind = post.get("type") or "input"
        subfolder = "" if self.flat_uploads else str(post.get("subfolder", ""))
        self.uploads.append({"filename": image.filename, "data": data, "subfolder": post.get("subfolder"),
                             "type": post.get("type")})  # the form's fields as sent
        base = str(self.dirs.get(kind, self.dirs["input"]))
        folder = os.path.join(base, os.path.normpath(subfolder))
        filename = image.filename
        path = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((base, path)) != base:
            return web.Response(status=400)
        os.makedirs(folder, exist_ok=True)
        stem, suffix = os.path.splitext(filename)
        counter, duplicate = 1, False
        while os.path.exists(path):
            if hashlib.sha256(Path(path).read_bytes()).digest() == hashlib.sha256(data).digest():
                duplicate = True
                break
            filename = f"{stem} ({counter}){suffix}"
            path, counter = os.path.join(folder, filename), counter + 1
        if not duplicate:
            Path(path).write_bytes(data)
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        self.views.append(dict(query))
        if "filename" in query:
            filename = query["filename"]
            if not filename or filename[0] == "/" or ".." in filename:
                return web.Response(status=400)
            base = self.dirs.get(query.get("type", "output"))
            if base is None:
                return web.Response(status=400)
            folder = str(base)
            if "subfolder" in query:
                full = os.path.join(folder, query["subfolder"])
                if os.path.commonpath((os.path.abspath(full), folder)) != folder:
                    return web.Response(status=403)
                folder = full
            file = os.path.join(folder, os.path.basename(filename))
            if os.path.isfile(file):
                return web.FileResponse(file, headers={"Content-Disposition": f'filename="{filename}"'})
        return web.Response(status=404)

    # -- the queue ----------------------------------------------------------------------------------------------
    async def post_prompt(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.prompts.append(body)
        number, self.number = self.number, self.number + 1
        if "prompt" not in body:
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                     "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt, prompt_id = body["prompt"], str(body.get("prompt_id", uuid.uuid4()))
        refused = self.validate(prompt)
        if refused is not None:
            return web.json_response({"error": refused[0], "node_errors": refused[1]}, status=400)
        extra_data = dict(body.get("extra_data", {}))
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        self.queue.append(prompt_id)
        asyncio.get_running_loop().create_task(self.execute(number, prompt_id, prompt, extra_data))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def validate(self, prompt: dict) -> tuple[dict, dict] | None:
        for node_id, node in prompt.items():
            if "class_type" not in node:
                return ({"type": "invalid_prompt", "details": f"Node ID '#{node_id}'", "extra_info": {},
                         "message": "Cannot execute because a node is missing the class_type property."}, {})
            if node["class_type"] not in self.node_types:
                return ({"type": "invalid_prompt", "details": f"Node ID '#{node_id}'", "extra_info": {},
                         "message": f"Cannot execute because node {node['class_type']} does not exist."}, {})
        if not any(node["class_type"] in OUTPUT_TYPES for node in prompt.values()):
            return ({"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                     "extra_info": {}}, {})
        return self.refusal

    async def execute(self, number: int, prompt_id: str, prompt: dict, extra_data: dict) -> None:
        """ComfyUI's prompt worker and PromptExecutor.execute_async, following the plan."""
        await asyncio.sleep(0)
        self.queue.remove(prompt_id)
        self.running, plan = prompt_id, self.plan
        sid = extra_data.get("client_id")
        messages: list[list] = []

        async def add_message(event: str, data: dict, broadcast: bool) -> None:
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, data])
            if sid is not None or broadcast:
                await self.send(event, data, sid)

        await add_message("execution_start", {"prompt_id": prompt_id}, False)
        await add_message("execution_cached", {"nodes": plan.cached, "prompt_id": prompt_id}, False)
        states: dict[str, dict] = {}
        for node in plan.cached:  # their cached outputs stand: finished at once, without 'executing'
            await self.progress_state(states, node, "finished", prompt_id, sid)
        outputs: dict[str, dict] = {}
        executed: list[str] = []
        success = True
        for run in plan.nodes:
            await self.progress_state(states, run.node, "running", prompt_id, sid)
            await self.send("executing", {"node": run.node, "display_node": run.node, "prompt_id": prompt_id}, sid)
            stopped = await self.steps(run, plan, prompt_id, sid, states)
            if stopped == "closed":
                return
            if stopped or run.error is not None:
                details = {"prompt_id": prompt_id, "node_id": run.node, "node_type": prompt[run.node]["class_type"],
                           "executed": list(executed)}
                if stopped:
                    await add_message("execution_interrupted", details, True)
                else:
                    await add_message("execution_error", {
                        **details, "exception_type": run.error[0], "exception_message": run.error[1],
                        "traceback": ["  File \"nodes.py\", line 1\n"], "current_inputs": {},
                        "current_outputs": list(executed)}, False)
                success = False
                break
            if run.report is not None:
                await self.send("krea.report", {"node": run.node, "display_node": run.node, "prompt_id": prompt_id,
                                                "text": run.report, "report": {}}, sid)
            if run.images or run.ui:
                outputs[run.node] = {**run.ui, **({"images": [self.save(*image) for image in run.images]}
                                                  if run.images else {})}
                await self.send("executed", {"node": run.node, "display_node": run.node,
                                             "output": outputs[run.node], "prompt_id": prompt_id}, sid)
            await self.progress_state(states, run.node, "finished", prompt_id, sid)
            executed.append(run.node)
        if success:
            await add_message("execution_success", {"prompt_id": prompt_id}, False)
        self.history[prompt_id] = {
            "prompt": [number, prompt_id, prompt, extra_data, [k for k, n in prompt.items()
                                                               if n["class_type"] in OUTPUT_TYPES]],
            "outputs": outputs,
            "status": {"status_str": "success" if success else "error", "completed": success, "messages": messages},
            "meta": {k: {"node_id": k, "display_node": k, "parent_node": None, "real_node_id": k} for k in outputs}}
        self.running = None
        await self.send("status", {"status": self.queue_info()}, None)
        if sid is not None:
            await self.send("executing", {"node": None, "prompt_id": prompt_id}, sid)

    async def progress_state(self, states: dict[str, dict], node: str, state: str, prompt_id: str, sid: str | None,
                             value: int | None = None, total: int | None = None) -> None:
        """WebUIProgressHandler's message: every node that is not pending, on each start, step and finish."""
        entry = states.setdefault(node, {"value": 0, "max": 1})
        entry.update(state=state, **({"value": value, "max": total} if value is not None else {}))
        await self.send("progress_state", {"prompt_id": prompt_id, "nodes": {
            k: {**v, "node_id": k, "prompt_id": prompt_id, "display_node_id": k, "parent_node_id": None,
                "real_node_id": k} for k, v in states.items()}}, sid)

    async def steps(self, run: NodeRun, plan: Plan, prompt_id: str, sid: str | None,
                    states: dict[str, dict]) -> str | bool:
        """The node's progress messages, each with a binary preview frame; True when interrupted."""
        for step in range(1, run.steps + 1):
            if plan.close_at_step == step:
                for ws in list(self.sockets.values()):
                    await ws.close()
                return "closed"
            if plan.hold_at_step == step:
                self.holding.set()
                await self.resume.wait()
            if self.interrupt.is_set():
                return True
            await self.progress_state(states, run.node, "running", prompt_id, sid, step, run.steps)
            await self.send("progress", {"value": step, "max": run.steps, "prompt_id": prompt_id,
                                         "node": run.node}, sid)
            if sid in self.sockets:  # PREVIEW_IMAGE (1): the event, the image type (1: JPEG), the image
                await self.sockets[sid].send_bytes(struct.pack(">I", 1) + struct.pack(">I", 1) + b"\xff\xd8jpeg")
        return False

    def save(self, subfolder: str | None, filename: str, data: bytes, kind: str) -> dict:
        """The file in the `kind` folder, and its ui entry (a custom node may leave out subfolder: None)."""
        folder = self.dirs[kind] / (subfolder or "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / filename).write_bytes(data)
        return {"filename": filename, **({"subfolder": subfolder} if subfolder is not None else {}), "type": kind}

    async def get_history(self, request: web.Request) -> web.Response:
        prompt_id = request.match_info["prompt_id"]
        self.history_asked += 1
        if prompt_id in self.history and self.plan.history_late > 0:
            self.plan.history_late -= 1
            return web.json_response({})
        return web.json_response({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            body = {}
        self.stops.append(("/interrupt", body))
        if not body.get("prompt_id") or body["prompt_id"] == self.running:
            self.interrupt.set()
            self.resume.set()
        return web.Response(status=200)

    async def post_queue(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.stops.append(("/queue", body))
        if body.get("clear"):
            self.queue.clear()
        for prompt_id in body.get("delete", []):
            if prompt_id in self.queue:
                self.queue.remove(prompt_id)
        return web.Response(status=200)


# -------------------------------------------------------------------------- run_on_server against the stand-in

ROOT = Path(__file__).resolve().parent.parent
I2I = json.loads((ROOT / "workflows/api/krea_image_to_image.json").read_text())
NODE_TYPES = {node["class_type"] for node in I2I.values()}
LIMIT = 20  # seconds for a run that should take a fraction of one: a client that never ends fails instead
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))  # /view serves the bytes as they are: any content will do


def i2i() -> dict:
    return json.loads(json.dumps(I2I))


def saving(*images: tuple[str, str, bytes, str], steps: int = 2, **plan) -> Plan:
    """The image-to-image workflow's run: the loader and text encoder cached, the sampler's steps, the save node's
    images."""
    return Plan(cached=["1", "2"], nodes=[NodeRun("7"), NodeRun("8"), NodeRun("3", steps=steps,
                                                                                report="2 of 2 steps computed"),
                                          NodeRun("4"), NodeRun("5"), NodeRun("6", images=list(images))], **plan)


@contextlib.asynccontextmanager
async def serving(standin: StandInComfyUI):
    async with TestServer(standin.application(), host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


def run(standin: StandInComfyUI, prompt: dict, output: Path, images: dict | None = None, embedded=None,
        during=None, headers: dict | None = None) -> tuple[list[Path], list[tuple[str, str]], ServerRun]:
    """run_on_server against the stand-in; `during(url, task)`, when given, runs beside it."""
    async def scenario():
        async with serving(standin) as url:
            server_run = ServerRun(url, headers or {})
            task = asyncio.create_task(run_on_server(prompt, server_run, output, images or {}, embedded))
            if during is not None:
                await during(url, task)
            written, reports = await task
            return written, reports, server_run

    return asyncio.run(asyncio.wait_for(scenario(), LIMIT))
