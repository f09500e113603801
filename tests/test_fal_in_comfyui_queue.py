"""fal requests on ComfyUI's own prompt queue (nodes/host/fal_queue.py's ComfyQueueBackend), run in-process over
stand-ins of the ComfyUI 0.3.64 server parts it uses (tests/comfyui_server_stand_ins.py): what it puts on the queue,
the position it reports, cancel of a waiting and of a running request, each way a request ends (read off ComfyUI's
history), the step logs and previews, the input image files and the model lookups. The real ComfyUI running fal
clients' requests is tests/test_fal_clients.py and tests/test_comfyui_host.py.
"""
from __future__ import annotations

import asyncio
import base64
import heapq
import io
import types

import pytest
import torch
from comfyui_server_stand_ins import FLUX_BIAS, FLUX_FACTORS, Comfy, forget_fal_queue, import_fal_queue
from PIL import Image

from comfyui_krea.fal_api.image_input import checked_image
from comfyui_krea.fal_api.jobs import CANCELLED, COMPLETED, IN_PROGRESS, IN_QUEUE, Job

BASE = "http://127.0.0.1:8188/fal"


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    made = Comfy(tmp_path)
    made.fal = import_fal_queue(monkeypatch, made)
    yield made
    forget_fal_queue()


def backend_of(comfy: Comfy):
    return comfy.fal.ComfyQueueBackend(comfy.start_server(), comfy.input_dir / "fal-uploads")


def workflow() -> dict:
    return {"3": {"class_type": "KreaSampler", "inputs": {"seed": 7}},
            "9": {"class_type": "KreaSaveImage", "inputs": {"images": ["3", 0]}}}


def request(streamed: bool = False) -> Job:
    return Job("fal-ai/flux/krea", types.SimpleNamespace(sync_mode=False, prompt="a red fox"), seed=7,
               base_url=BASE, wants_previews=streamed)


def ui_prompt(number: float, prompt_id: str) -> tuple:
    """A prompt queued by ComfyUI's own POST /prompt (the UI, API scripts)."""
    return number, prompt_id, {"1": {"class_type": "SaveImage", "inputs": {}}}, {"client_id": "ui"}, ["1"]


def messages(prompt_id: str, end: str | None, start_ms: int = 1_000, end_ms: int = 3_500, **end_data) -> list:
    """The status messages ComfyUI's executor records (execution.py, add_message): each event with a timestamp."""
    recorded = [("execution_start", {"prompt_id": prompt_id, "timestamp": start_ms}),
                ("execution_cached", {"nodes": [], "prompt_id": prompt_id, "timestamp": start_ms + 1})]
    if end is not None:
        recorded.append((end, {"prompt_id": prompt_id, **end_data, "timestamp": end_ms}))
    return recorded


def saved(comfy: Comfy, job: Job, size: tuple[int, int] = (24, 16)) -> dict:
    """What KreaSaveImage saved for `job`: the file under output/fal/, its entry in the node's ui output."""
    folder = comfy.output_dir / "fal"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(folder / f"{job.id}_00001_.png")
    return {"9": {"images": [{"filename": f"{job.id}_00001_.png", "subfolder": "fal", "type": "output"}]}}


async def until(condition, timeout_s: float = 1.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not reached in time")


def log_lines(job: Job) -> list[str]:
    return [entry["message"] for entry in job.logs]


def test_a_request_is_queued_as_post_prompt_queues_a_prompt_numbered_after_the_last(comfy):
    async def scenario():
        backend = backend_of(comfy)
        server = comfy.server_class.instance
        server.number = 5  # five prompts were queued before
        first, second = request(), request()
        await backend.submit(first, workflow())
        await backend.submit(second, workflow())
        assert comfy.validations == [(first.id, workflow(), None), (second.id, workflow(), None)]
        assert sorted(server.prompt_queue.queue) == [(5, first.id, workflow(), {}, ["9"]),
                                                     (6, second.id, workflow(), {}, ["9"])]
        assert server.number == 7
        for job in (first, second):
            backend.cancel(job)
    asyncio.run(scenario())


def test_a_workflow_comfyui_refuses_is_refused_with_its_reasons_and_nothing_is_queued(comfy):
    comfy.refusal = (False, {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                             "details": "", "extra_info": {}}, [],
                     {"3": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                        "details": "transformer: 'gone.safetensors' not in []",
                                        "extra_info": {"input_name": "transformer"}}],
                            "dependent_outputs": ["9"], "class_type": "KreaSampler"}})
    backend = backend_of(comfy)
    job = request()
    with pytest.raises(comfy.fal.WorkflowRefused,
                       match=r"^Prompt outputs failed validation; node 3 \(KreaSampler\): .*gone.safetensors"):
        asyncio.run(backend.submit(job, workflow()))
    server = comfy.server_class.instance
    assert server.prompt_queue.queue == [] and server.number == 0 and job.status == IN_QUEUE


def test_the_position_is_the_place_among_the_prompts_comfyuis_worker_takes_first(comfy):
    async def scenario():
        backend = backend_of(comfy)
        server = comfy.server_class.instance
        for number in (5, 6, 7):
            server.prompt_queue.put(ui_prompt(number, f"ui-{number}"))
        server.number = 8
        first, second = request(), request()
        await backend.submit(first, workflow())
        server.prompt_queue.put(ui_prompt(-3, "ui-front"))  # "front": queued first, numbered -number
        await backend.submit(second, workflow())
        waiting = server.prompt_queue.queue
        assert [item[0] for item in waiting] != sorted(item[0] for item in waiting)  # a heap, not a sorted list
        order = [heapq.heappop(copy)[1] for copy in [list(waiting)] for _ in waiting]  # the worker's order
        assert [backend.position(first), backend.position(second)] == [order.index(first.id),
                                                                       order.index(second.id)] == [4, 5]
        comfy.run_next()  # the front prompt runs: each moves up one
        assert [backend.position(first), backend.position(second)] == [3, 4]
        for _ in range(4):
            comfy.run_next()
        assert backend.position(first) is None and backend.position(second) == 0  # running: no place in line
        backend.cancel(second)
    asyncio.run(scenario())


def test_a_prompt_numbered_like_a_fal_request_is_counted_in_the_order_comfyuis_worker_takes_them(comfy):
    """POST /prompt keeps a client's own "number" (a float): on a tie the worker, popping its heap of whole items,
    takes the smaller prompt id first, so the position is counted the same way."""
    async def scenario():
        backend = backend_of(comfy)
        server = comfy.server_class.instance
        server.prompt_queue.put(ui_prompt(-1, "ui-front"))
        job = request()
        await backend.submit(job, workflow())  # number 0
        server.prompt_queue.put(ui_prompt(0.0, "0-tie"))  # "0-" sorts before every uuid
        waiting = server.prompt_queue.queue
        order = [heapq.heappop(copy)[1] for copy in [list(waiting)] for _ in waiting]
        assert order == ["ui-front", "0-tie", job.id] and backend.position(job) == 2
        backend.cancel(job)
    asyncio.run(scenario())


def test_a_waiting_request_cancelled_leaves_the_queue_and_ends_at_once_without_interrupting(comfy):
    async def scenario():
        backend = backend_of(comfy)
        server = comfy.server_class.instance
        server.prompt_queue.put(ui_prompt(-1, "ui-front"))
        kept, cancelled = request(), request()
        await backend.submit(kept, workflow())
        await backend.submit(cancelled, workflow())
        backend.cancel(cancelled)
        assert sorted(item[1] for item in server.prompt_queue.queue) == sorted(["ui-front", kept.id])
        assert (cancelled.status, cancelled.error, cancelled.error_type) == (
            COMPLETED, "the request was cancelled while it waited", CANCELLED)
        assert kept.status == IN_QUEUE and comfy.interrupts == []
        logged = list(cancelled.logs)
        backend.on_step(cancelled.id, 1, 4, torch.zeros(1, 16, 2, 2))  # no longer followed
        assert cancelled.logs == logged
        backend.cancel(kept)
    asyncio.run(scenario())


def test_a_running_request_cancelled_interrupts_comfyui_and_ends_as_cancelled_when_it_stops(comfy):
    async def scenario():
        backend = backend_of(comfy)
        job = request()
        await backend.submit(job, workflow())
        _, number = comfy.run_next(nodes=("3",))
        backend.cancel(job)
        assert comfy.interrupts == [True] and job.status != COMPLETED  # ComfyUI stops it within a step
        comfy.end(number, "error", messages(job.id, "execution_interrupted", node_id="3", node_type="KreaSampler",
                                            executed=[]))
        await until(lambda: job.done)
        assert (job.error, job.error_type) == ("the request was cancelled while it ran", CANCELLED)
        assert job.output is None
    asyncio.run(scenario())


def test_cancelling_an_ended_request_never_interrupts_the_prompt_comfyui_runs_now(comfy):
    async def scenario():
        backend = backend_of(comfy)
        job = request()
        await backend.submit(job, workflow())
        backend.cancel(job)
        comfy.server_class.instance.prompt_queue.put(ui_prompt(1, "ui-other"))
        comfy.run_next()
        backend.cancel(job)
        assert comfy.interrupts == []
    asyncio.run(scenario())


def test_a_request_shows_in_progress_with_its_node_starts_and_ends_with_comfyuis_saved_images(comfy):
    async def scenario():
        backend = backend_of(comfy)
        job = request()
        await backend.submit(job, workflow())
        await asyncio.sleep(0.02)  # the watcher looks at it while it waits
        assert job.status == IN_QUEUE and job.logs == []
        _, number = comfy.run_next(nodes=("3",))
        await until(lambda: len(job.logs) == 2)
        assert job.status == IN_PROGRESS
        comfy.registry.nodes.update({"9": object(), "3.0.1": object()})  # "3.0.1": a node of an expansion
        await until(lambda: len(job.logs) == 4)
        comfy.end(number, "success", messages(job.id, "execution_success"), saved(comfy, job))
        await until(lambda: not backend._jobs)
        assert job.error is None
        assert job.output == {"images": [{"url": f"{BASE}/results/{job.id}/0.png", "width": 24, "height": 16,
                                          "content_type": "image/png"}],
                              "timings": {"inference": 2.5}, "seed": 7, "has_nsfw_concepts": [False],
                              "prompt": "a red fox"}
        assert log_lines(job) == ["started", "running KreaSampler (node 3)", "running KreaSaveImage (node 9)",
                                  "running node (node 3.0.1)", "done"]
        assert backend._seen == {}  # nothing of an ended request is kept
    asyncio.run(scenario())


def test_a_node_error_ends_the_request_with_the_node_and_comfyuis_exception(comfy):
    async def scenario():
        backend = backend_of(comfy)
        job = request()
        await backend.submit(job, workflow())
        _, number = comfy.run_next()
        comfy.end(number, "error", messages(
            job.id, "execution_error", node_id="3", node_type="KreaSampler", executed=[],
            exception_message="CUDA out of memory. Tried to allocate 2.00 GiB",
            exception_type="torch.OutOfMemoryError", traceback=[], current_inputs={}, current_outputs=[]))
        await until(lambda: job.done)
        assert (job.error, job.error_type) == ("KreaSampler: CUDA out of memory. Tried to allocate 2.00 GiB",
                                               "torch.OutOfMemoryError")
    asyncio.run(scenario())


@pytest.mark.parametrize("status", [None, {"status_str": "error", "completed": False, "messages": None}],
                         ids=["no status", "no end event"])
def test_a_failure_comfyui_recorded_no_details_of_still_ends_the_request(comfy, status):
    async def scenario():
        backend = backend_of(comfy)
        job = request()
        await backend.submit(job, workflow())
        _, number = comfy.run_next()
        if status is not None:
            status["messages"] = messages(job.id, None)
        comfy.server_class.instance.prompt_queue.task_done(number, {"outputs": {}, "meta": {}}, status)
        await until(lambda: job.done)
        assert (job.error, job.error_type) == ("a node: failed", "execution_error")
    asyncio.run(scenario())


def test_a_success_without_timestamps_or_images_ends_with_no_images_and_no_time(comfy):
    async def scenario():
        backend = backend_of(comfy)
        job = request()
        await backend.submit(job, workflow())
        _, number = comfy.run_next()
        comfy.server_class.instance.prompt_queue.task_done(
            number, {"meta": {}}, {"status_str": "success", "completed": True, "messages": []})
        del comfy.server_class.instance.prompt_queue.history[job.id]["outputs"]
        await until(lambda: job.done)
        assert job.error is None and job.output["images"] == [] and job.output["timings"] == {"inference": 0.0}
    asyncio.run(scenario())


def test_a_request_whose_end_cannot_be_read_fails_alone_and_the_others_are_still_followed(comfy):
    async def scenario():
        backend = backend_of(comfy)
        broken, next_one = request(), request()
        await backend.submit(broken, workflow())
        await backend.submit(next_one, workflow())
        _, number = comfy.run_next()
        outputs = saved(comfy, broken)
        (comfy.output_dir / "fal" / f"{broken.id}_00001_.png").unlink()  # removed before it was read
        comfy.end(number, "success", messages(broken.id, "execution_success"), outputs)
        await until(lambda: broken.done)
        assert broken.error_type == "internal_error"
        assert broken.error.startswith(f"FileNotFoundError: the workflow reported '{broken.id}_00001_.png'")
        _, number = comfy.run_next(nodes=("3",))
        await until(lambda: "running KreaSampler (node 3)" in log_lines(next_one))
        comfy.end(number, "success", messages(next_one.id, "execution_success"), saved(comfy, next_one))
        await until(lambda: next_one.done)
        assert next_one.error is None and len(next_one.output["images"]) == 1
    asyncio.run(scenario())


def test_each_step_is_logged_and_a_streamed_request_gets_comfyuis_latent_preview_but_the_last(comfy):
    async def scenario():
        backend = backend_of(comfy)
        streamed, plain = request(streamed=True), request()
        await backend.submit(streamed, workflow())
        await backend.submit(plain, workflow())
        latents = [torch.full((1, 16, 6, 8), float(step)) for step in range(4)]
        for step, x0 in enumerate(latents[:3], start=1):
            backend.on_step(streamed.id, step, 3, x0)  # from ComfyUI's worker thread
        backend.on_step(plain.id, 1, 3, latents[3])
        backend.on_step("ui-prompt", 1, 3, latents[3])  # a prompt of ComfyUI's own: not a fal request
        assert streamed.status == plain.status == IN_PROGRESS
        assert log_lines(streamed) == ["started", "step 1/3", "step 2/3", "step 3/3"]
        assert log_lines(plain) == ["started", "step 1/3"]
        (device, latent_format), = comfy.previewer_asked  # made once, for FLUX latents on the latent's device
        assert device == latents[0].device and type(latent_format).__name__ == "Flux"
        assert comfy.latent2rgb_made == [(FLUX_FACTORS, FLUX_BIAS)]  # no TAESD decoder: its linear map
        assert [(kind, x0) for kind, x0 in comfy.decoded] == [("latent2rgb", latents[0]), ("latent2rgb", latents[1])]
        assert all(decoded is given for (_, decoded), given in zip(comfy.decoded, latents))
        assert streamed.previews_made == 2 and plain.previews_made == 0 and plain.preview is None
        preview = streamed.preview
        assert (preview["width"], preview["height"], preview["content_type"]) == (8, 6, "image/jpeg")
        assert Image.open(io.BytesIO(base64.b64decode(preview["url"].split(",")[1]))).size == (8, 6)
        for job in (streamed, plain):
            backend.cancel(job)
    asyncio.run(scenario())


def test_a_taesd_decoder_comfyui_finds_makes_the_previews(comfy):
    comfy.taesd = True
    backend = backend_of(comfy)
    job = request(streamed=True)
    asyncio.run(backend.submit(job, workflow()))
    backend.on_step(job.id, 1, 2, torch.zeros(1, 16, 4, 5))
    assert comfy.latent2rgb_made == [] and [kind for kind, _ in comfy.decoded] == ["taesd"]
    assert (job.preview["width"], job.preview["height"]) == (40, 32)


def test_an_input_image_is_a_file_loadimage_reads_under_input_removed_when_the_request_ends(comfy):
    backend = backend_of(comfy)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    image = checked_image(buffer.getvalue())
    kept, removed_early = request(), request()
    reference = backend.image_reference(kept, image)
    assert reference.startswith("fal-uploads/input-") and "\\" not in reference
    assert (comfy.input_dir / reference).read_bytes() == buffer.getvalue()  # what ComfyUI's LoadImage opens
    other = backend.image_reference(removed_early, image)
    (comfy.input_dir / other).unlink()  # someone cleared input/ while it ran: the end still comes
    kept.complete(error="x", error_type="x")
    removed_early.complete(error="x", error_type="x")
    assert not (comfy.input_dir / reference).exists() and removed_early.done


def test_model_files_are_looked_up_in_comfyuis_folders_and_names_leaving_them_are_refused(comfy):
    backend = backend_of(comfy)
    first, extra = comfy.loras()
    (extra / "style").mkdir(parents=True)
    (extra / "style" / "ink.safetensors").write_bytes(b"x")
    assert backend.model_folder("loras") == first  # where fetched LoRAs are cached: the first folder
    assert backend.model_file("loras", "style/ink.safetensors") == extra / "style" / "ink.safetensors"
    assert backend.model_file("loras", "missing.safetensors") is None
    with pytest.raises(ValueError, match="leaves the model folder"):
        backend.model_file("loras", "../style/ink.safetensors")


def test_a_request_cancelled_while_another_ends_leaves_the_rest_followed(comfy):
    async def scenario():
        backend = backend_of(comfy)
        ending, cancelled, later = request(), request(), request()
        for job in (ending, cancelled, later):
            await backend.submit(job, workflow())
        queue = comfy.server_class.instance.prompt_queue
        read = queue.get_history

        def get_history(prompt_id=None):  # a client's cancel comes while the end of another request is read
            if ending.id in queue.history and not cancelled.done:
                asyncio.get_running_loop().call_soon(backend.cancel, cancelled)
            return read(prompt_id)
        queue.get_history = get_history
        _, number = comfy.run_next()
        comfy.end(number, "success", messages(ending.id, "execution_success"), saved(comfy, ending))
        await until(lambda: ending.done and cancelled.done)
        _, number = comfy.run_next()
        comfy.end(number, "success", messages(later.id, "execution_success"), saved(comfy, later))
        await until(lambda: later.done)
        assert cancelled.error_type == CANCELLED and ending.error is None and later.error is None
    asyncio.run(scenario())
