"""Stand-ins of the parts of ComfyUI 0.3.64's server that nodes/host/fal_queue.py touches, so the fal backend inside
ComfyUI runs in-process in the plain suite (tests/test_fal_in_comfyui_queue.py). Each keeps the real one's shapes:

- execution.PromptQueue: a heap of waiting items `(number, prompt_id, prompt, extra_data, outputs_to_execute)` (the
  worker pops the smallest tuple), the running ones by task number (a copy of the item), the history by prompt id
  ({"prompt", "outputs", "meta", "status": {"status_str", "completed", "messages": [(event, data), ...]}}), read
  back as a copy; get_current_queue_volatile gives (running, waiting) with the waiting ones in heap order, not sorted.
- execution.validate_prompt(prompt_id, prompt, partial_execution_targets) -> (ok, error, outputs, node_errors).
- server.PromptServer: `instance` exists only once a server was made; `number` counts POST /prompt's numbers;
  `routes` is an aiohttp RouteTableDef that ComfyUI adds to its app.
- nodes.interrupt_processing(value=True), comfy_execution.progress.get_progress_state() (prompt_id, nodes by id),
  latent_preview.get_previewer / Latent2RGBPreviewer, comfy.latent_formats.Flux, comfy.cli_args.args,
  folder_paths' directories and model lookups (get_full_path: a file in one of the folder's paths, else None).

What the real ComfyUI then does with the prompt (validation against its node classes, running it) is checked
against the real thing in tests/test_comfyui_host.py and tests/test_fal_clients.py.
"""
from __future__ import annotations

import copy
import heapq
import importlib
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from PIL import Image


class PromptQueue:
    def __init__(self, server) -> None:
        self.server = server
        self.queue: list[tuple] = []
        self.currently_running: dict[int, tuple] = {}
        self.history: dict[str, dict] = {}
        self.task_counter = 0

    def put(self, item: tuple) -> None:
        heapq.heappush(self.queue, item)

    def get(self) -> tuple[tuple, int]:
        """What ComfyUI's prompt worker takes next: (item, task number)."""
        item = heapq.heappop(self.queue)
        number, self.task_counter = self.task_counter, self.task_counter + 1
        self.currently_running[number] = copy.deepcopy(item)
        return item, number

    def task_done(self, number: int, history_result: dict, status: dict | None) -> None:
        item = self.currently_running.pop(number)
        self.history[item[1]] = {"prompt": item, "outputs": {}, "status": copy.deepcopy(status), **history_result}

    def get_current_queue_volatile(self) -> tuple[list, list]:
        return list(self.currently_running.values()), list(self.queue)

    def delete_queue_item(self, function) -> bool:
        for index, item in enumerate(self.queue):
            if function(item):
                self.queue.pop(index)
                heapq.heapify(self.queue)
                return True
        return False

    def get_history(self, prompt_id: str | None = None) -> dict:
        if prompt_id is None:
            return dict(self.history)
        return {prompt_id: copy.deepcopy(self.history[prompt_id])} if prompt_id in self.history else {}


@dataclass
class Comfy:
    """One ComfyUI: its folders, what the backend asked of it, and the answers it gives."""
    root: Path
    validations: list[tuple] = field(default_factory=list)
    interrupts: list[bool] = field(default_factory=list)
    previewer_asked: list[tuple] = field(default_factory=list)  # get_previewer(device, latent format)
    latent2rgb_made: list[tuple] = field(default_factory=list)  # Latent2RGBPreviewer(factors, bias)
    decoded: list = field(default_factory=list)  # the latents the previewer was given
    taesd: bool = False  # whether get_previewer finds a TAESD decoder (else ComfyUI falls back to latent2rgb)
    refusal: tuple | None = None  # validate_prompt's answer to give instead of accepting
    registry: types.SimpleNamespace = field(default_factory=lambda: types.SimpleNamespace(prompt_id="", nodes={}))
    server_class: type | None = None

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    def loras(self) -> list[Path]:
        return [self.root / "models" / "loras", self.root / "extra" / "loras"]

    def start_server(self):
        """ComfyUI's main.py makes its PromptServer before the custom nodes import."""
        return self.server_class()

    def run_next(self, nodes: tuple[str, ...] = ()) -> tuple[str, int]:
        """The worker takes the next prompt (the progress registry then belongs to it, `nodes` started)."""
        item, number = self.server_class.instance.prompt_queue.get()
        self.registry.prompt_id, self.registry.nodes = item[1], {node: object() for node in nodes}
        return item[1], number

    def end(self, number: int, status_str: str, messages: list[tuple], outputs: dict | None = None) -> None:
        history = {"outputs": outputs or {}, "meta": {}}
        status = {"status_str": status_str, "completed": status_str == "success", "messages": messages}
        self.server_class.instance.prompt_queue.task_done(number, history, status)


FLUX_FACTORS = [[0.01 * row, -0.02 * row, 0.03] for row in range(16)]  # 16 latent channels -> RGB (stand-in values)
FLUX_BIAS = [-0.1, 0.2, -0.3]


class LatentPreviewer:
    def __init__(self, comfy: Comfy, kind: str) -> None:
        self.comfy, self.kind = comfy, kind

    def decode_latent_to_preview(self, x0):
        """A PIL image of the latent's size, as ComfyUI's previewers give (theirs is 8x the latent for TAESD)."""
        self.comfy.decoded.append((self.kind, x0))
        scale = 8 if self.kind == "taesd" else 1
        return Image.new("RGB", (x0.shape[-1] * scale, x0.shape[-2] * scale), (20, 40, 60))


def modules(comfy: Comfy) -> dict[str, types.ModuleType]:
    def module(name: str, **attributes) -> types.ModuleType:
        made = types.ModuleType(name)
        made.__dict__.update(attributes)
        return made

    class PromptServer:
        def __init__(self) -> None:
            PromptServer.instance = self
            self.prompt_queue = PromptQueue(self)
            self.number = 0
            self.routes = web.RouteTableDef()

    comfy.server_class = PromptServer

    async def validate_prompt(prompt_id, prompt, partial_execution_targets):
        comfy.validations.append((prompt_id, prompt, partial_execution_targets))
        if comfy.refusal is not None:
            return comfy.refusal
        outputs = [node for node, entry in prompt.items() if entry.get("class_type") == "KreaSaveImage"]
        return True, None, outputs, {}

    class Flux:  # comfy.latent_formats.Flux: what a previewer of FLUX latents is made from
        latent_channels = 16
        taesd_decoder_name = "taef1_decoder"

        def __init__(self) -> None:
            self.latent_rgb_factors, self.latent_rgb_factors_bias = FLUX_FACTORS, FLUX_BIAS

    def get_previewer(device, latent_format):
        comfy.previewer_asked.append((device, latent_format))
        return LatentPreviewer(comfy, "taesd") if comfy.taesd else None

    def latent2rgb(factors, bias=None):
        comfy.latent2rgb_made.append((factors, bias))
        return LatentPreviewer(comfy, "latent2rgb")

    def get_full_path(folder_name: str, filename: str) -> str | None:
        for folder in folders.get(folder_name, []):
            if (folder / filename).is_file():
                return os.path.join(folder, filename)
        return None

    folders = {"loras": comfy.loras()}
    made = {
        "server": module("server", PromptServer=PromptServer),
        "execution": module("execution", validate_prompt=validate_prompt, PromptQueue=PromptQueue),
        "nodes": module("nodes", interrupt_processing=lambda value=True: comfy.interrupts.append(value)),
        "folder_paths": module(
            "folder_paths", get_output_directory=lambda: str(comfy.output_dir),
            get_input_directory=lambda: str(comfy.input_dir), get_full_path=get_full_path,
            get_folder_paths=lambda name: [str(path) for path in folders[name]]),
        "latent_preview": module("latent_preview", get_previewer=get_previewer, Latent2RGBPreviewer=latent2rgb),
        "comfy": module("comfy"),
        "comfy.latent_formats": module("comfy.latent_formats", Flux=Flux),
        "comfy.cli_args": module("comfy.cli_args", args=types.SimpleNamespace(tls_keyfile=None)),
        "comfy_execution": module("comfy_execution"),
        "comfy_execution.progress": module("comfy_execution.progress", get_progress_state=lambda: comfy.registry),
    }
    made["comfy"].latent_formats, made["comfy"].cli_args = made["comfy.latent_formats"], made["comfy.cli_args"]
    made["comfy_execution"].progress = made["comfy_execution.progress"]
    return made


FAL_QUEUE = "comfyui_krea.nodes.host.fal_queue"


def import_fal_queue(monkeypatch, comfy: Comfy, watch_s: float = 0.002) -> types.ModuleType:
    """nodes/host/fal_queue.py imported over the stand-ins (monkeypatch takes them away again: call
    `forget_fal_queue` after the test, so the rest of the session never sees a module bound to them)."""
    for name, made in modules(comfy).items():
        monkeypatch.setitem(sys.modules, name, made)
    monkeypatch.delitem(sys.modules, FAL_QUEUE, raising=False)
    fal_queue = importlib.import_module(FAL_QUEUE)
    monkeypatch.setattr(fal_queue, "WATCH_S", watch_s)  # the watcher's poll, shortened for the tests
    return fal_queue


def forget_fal_queue() -> None:
    sys.modules.pop(FAL_QUEUE, None)
    package = sys.modules["comfyui_krea.nodes.host"]
    if hasattr(package, "fal_queue"):
        delattr(package, "fal_queue")
