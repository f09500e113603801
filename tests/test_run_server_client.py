"""`run --server`'s client (standalone/remote.py) in-process against a stand-in ComfyUI 0.3.64 (comfyui_standin.py):
what it sends (the uploads, the prompt body under its client id), what it saves (every image the server saved, in
the same sub-folders, never over another file nor outside --output), its progress lines, Ctrl-C, and its errors.
tests/test_run_server.py runs the same command against the real ComfyUI."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("aiohttp", reason="run --server needs aiohttp: pip install -e '.[serve]'")

from comfyui_http_standin import NODE_TYPES, PNG, NodeRun, StandInComfyUI, i2i, run, saving, serving  # noqa: E402

from comfyui_krea.standalone.remote import RunFailed, ServerRun  # noqa: E402
from comfyui_krea.standalone.runner import WorkflowError  # noqa: E402
from comfyui_krea.standalone.terminal import TERMINAL  # noqa: E402


@pytest.fixture
def standin(tmp_path) -> StandInComfyUI:
    return StandInComfyUI(tmp_path / "comfyui", NODE_TYPES)


def test_the_prompt_goes_with_the_clients_id_the_uploaded_image_and_the_embedded_workflow(standin, tmp_path):
    image = tmp_path / "input.png"
    image.write_bytes(PNG)
    taken = standin.dirs["input"] / "krea-cli" / "input.png"  # another client's upload of another image
    taken.parent.mkdir()
    taken.write_bytes(b"other")
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"))
    given = []

    def embedded(final: dict) -> dict:
        given.append(json.loads(json.dumps(final)))
        return {"workflow": {"nodes": [{"id": 3, "type": "KreaSampler"}]}}

    written, reports, server_run = run(standin, i2i(), tmp_path / "out", {"7": image}, embedded)
    assert standin.uploads == [{"filename": "input.png", "data": PNG, "subfolder": "krea-cli", "type": "input"}]
    (body,) = standin.prompts
    expected = i2i()
    expected["7"]["inputs"]["image"] = "krea-cli/input (1).png"  # the name the server gave the upload
    assert body == {"prompt": expected, "client_id": server_run.client_id,
                    "extra_data": {"extra_pnginfo": {"workflow": {"nodes": [{"id": 3, "type": "KreaSampler"}]}}}}
    assert given == [expected]
    assert (standin.dirs["input"] / "krea-cli" / "input (1).png").read_bytes() == PNG and taken.read_bytes() == b"other"
    assert server_run.prompt_id == next(iter(standin.history))
    assert written == [tmp_path / "out" / "krea" / "krea_00001_.png"] and written[0].read_bytes() == PNG
    assert reports == [("3", "2 of 2 steps computed")]


def test_an_image_uploaded_before_is_named_as_the_server_kept_it(standin, tmp_path):
    image = tmp_path / "input.png"
    image.write_bytes(PNG)
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"))
    for _ in range(2):
        run(standin, i2i(), tmp_path / "out", {"7": image})
    assert [body["prompt"]["7"]["inputs"]["image"] for body in standin.prompts] == ["krea-cli/input.png"] * 2


def test_without_an_embedded_workflow_the_prompt_has_no_extra_data(standin, tmp_path):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"))
    run(standin, i2i(), tmp_path / "out", embedded=lambda final: None)
    run(standin, i2i(), tmp_path / "out")
    assert ["extra_data" in body for body in standin.prompts] == [False, False]
    assert all(body["client_id"] and body["prompt"] == i2i() for body in standin.prompts)


def test_a_refused_upload_stops_before_anything_is_queued(tmp_path):
    standin = StandInComfyUI(tmp_path / "comfyui", NODE_TYPES, max_upload_size=1024)
    image = tmp_path / "big.png"
    image.write_bytes(PNG * 100)
    with pytest.raises(WorkflowError) as refused:
        run(standin, i2i(), tmp_path / "out", {"7": image})
    assert str(refused.value).startswith(f"uploading {image} to the server failed: HTTP 413 ")
    assert str(refused.value).endswith("HTTP 413 Maximum request body size 1024 exceeded.")  # aiohttp's text
    assert standin.prompts == [] and not (tmp_path / "out").exists()


def test_a_refused_prompt_says_each_problem_under_its_node_and_queues_nothing(standin, tmp_path):
    standin.refusal = ({"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                        "details": "Value 99 bigger than max of 50: num_inference_steps", "extra_info": {}},
                       {"3": {"class_type": "KreaSampler", "dependent_outputs": ["6"], "errors": [
                           {"type": "value_bigger_than_max", "message": "Value 99 bigger than max of 50",
                            "details": "num_inference_steps", "extra_info": {"input_name": "num_inference_steps"}}]}})
    with pytest.raises(WorkflowError) as refused:
        run(standin, i2i(), tmp_path / "out")
    assert str(refused.value) == ("the server refused the workflow:\n"
                                  "  node 3 (Krea Sampler): num_inference_steps: Value 99 bigger than max of 50")
    assert standin.history == {} and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, line", [
    (lambda p: p["5"].update(class_type="NotInstalled"),
     "Cannot execute because node NotInstalled does not exist.: Node ID '#5'"),
    (lambda p: p.pop("6"), "Prompt has no outputs"),  # no details: no dangling ": "
], ids=["unknown node type", "no outputs"])
def test_a_refusal_without_node_errors_gives_the_servers_message(standin, tmp_path, change, line):
    prompt = i2i()
    change(prompt)
    with pytest.raises(WorkflowError) as refused:
        run(standin, prompt, tmp_path / "out")
    assert str(refused.value) == f"the server refused the workflow:\n  {line}"


@pytest.mark.parametrize("status, page", [(502, "<html><body><h1>502 Bad Gateway</h1></body></html>"),
                                          (200, "<html><body>Sign in to continue</body></html>"),
                                          (400, "<html>400 Bad Request</html>")])
def test_a_proxys_page_instead_of_comfyuis_answer_is_said_as_it_came(standin, tmp_path, status, page):
    standin.proxy_answer = (status, page)
    with pytest.raises(WorkflowError) as refused:
        run(standin, i2i(), tmp_path / "out")
    assert str(refused.value) == f"POST /prompt: HTTP {status} {page}"
    assert standin.prompts == [] and not (tmp_path / "out").exists()


def test_progress_lines_name_each_node_the_cached_ones_and_the_steps(standin, tmp_path, capsys):
    prompt = i2i()
    del prompt["4"]["_meta"]  # untitled: its class type
    prompt["5"]["_meta"] = {}
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), steps=3)
    standin.plan.cached = ["1", "2", "99"]  # a node the prompt does not have: its id
    standin.plan.nodes.insert(2, NodeRun("5.0.0.2"))  # a node another node expanded into at run time: its id
    TERMINAL.end_line()  # a bar an earlier test left open
    capsys.readouterr()
    run(standin, prompt, tmp_path / "out")
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").split("\n")
    assert lines[:5] == ["  cached: Krea Model Loader, Krea Text Encode, 99", "  Load Image", "  Krea Encode Image",
                         "  5.0.0.2", "  Krea Sampler"]
    assert lines[5:8] == ["", "    [##########....................] 1/3", "    [####################..........] 2/3"]
    assert lines[8:] == ["    [##############################] 3/3", "  KreaDecode", "  KreaSafetyCheck",
                         "  Krea Save Image", ""]


def test_a_node_failing_on_the_server_is_an_error_naming_it_and_nothing_is_saved(standin, tmp_path):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"))
    standin.plan.nodes[2].error = ("torch.OutOfMemoryError", "CUDA out of memory.")
    with pytest.raises(RunFailed) as failed:
        run(standin, i2i(), tmp_path / "out")
    assert str(failed.value) == ("KreaSampler (node 3) failed on the server: torch.OutOfMemoryError: "
                                 "CUDA out of memory.")
    assert not (tmp_path / "out").exists()


def test_a_run_cancelled_on_the_server_is_an_error(standin, tmp_path):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), steps=4, hold_at_step=2)

    async def cancel_in_the_ui(url, task):
        import aiohttp

        await standin.holding.wait()
        async with aiohttp.ClientSession() as session:
            await (await session.post(f"{url}/interrupt", json={})).read()  # the UI's Cancel: no prompt id

    with pytest.raises(RunFailed, match="^the run was interrupted on the server$"):
        run(standin, i2i(), tmp_path / "out", during=cancel_in_the_ui)
    assert not (tmp_path / "out").exists()


def test_other_prompts_messages_are_not_taken_for_ours(standin, tmp_path, capsys):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), steps=2, hold_at_step=2)

    async def another_client(url, task):
        await standin.holding.wait()
        # What every socket gets of a prompt queued without a client id (broadcast), and another node of ours.
        await standin.send("execution_interrupted", {"prompt_id": "other", "node_id": "3", "node_type": "KSampler",
                                                     "executed": [], "timestamp": 1}, None)
        await standin.send("execution_error", {"prompt_id": "other", "node_id": "3", "node_type": "KSampler",
                                               "exception_type": "X", "exception_message": "y"}, None)
        await standin.send("executing", {"node": None, "prompt_id": "other"}, None)
        await standin.send("executing", {"node": "9", "display_node": "9", "prompt_id": "other"}, None)
        # Another pack's message (any pack may send its own): a text, but not the pack's report.
        await standin.send("otherpack.status", {"node": "3", "text": "loading weights"}, None)
        standin.resume.set()

    written, reports, _ = run(standin, i2i(), tmp_path / "out", during=another_client)
    assert written == [tmp_path / "out" / "krea" / "krea_00001_.png"]
    assert reports == [("3", "2 of 2 steps computed")]
    assert "  9" not in capsys.readouterr().err.split("\n")


def test_ctrl_c_interrupts_the_servers_job_and_takes_it_off_the_queue(standin, tmp_path):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), steps=4, hold_at_step=2)
    ids = []

    async def ctrl_c(url, task):
        await standin.holding.wait()
        ids.append(standin.running)
        task.cancel()

    with pytest.raises(asyncio.CancelledError):
        run(standin, i2i(), tmp_path / "out", during=ctrl_c)
    assert standin.stops == [("/interrupt", {"prompt_id": ids[0]}), ("/queue", {"delete": [ids[0]]})]
    assert standin.interrupt.is_set() and not (tmp_path / "out").exists()


def test_a_server_that_goes_away_mid_run_is_an_error(standin, tmp_path):
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"), steps=3, close_at_step=2)
    with pytest.raises(RunFailed, match="^the server closed the connection before the run ended$"):
        run(standin, i2i(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stopping_before_the_prompt_was_queued_asks_the_server_nothing(standin):
    import aiohttp

    from comfyui_krea.standalone.remote import stop_on_server

    async def scenario():
        async with serving(standin) as url, aiohttp.ClientSession() as session:
            await stop_on_server(session, ServerRun(url))

    asyncio.run(scenario())
    assert standin.stops == []


def test_stopping_on_a_server_that_is_gone_is_no_error():
    import socket

    import aiohttp

    from comfyui_krea.standalone.remote import stop_on_server

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            await stop_on_server(session, ServerRun(f"http://127.0.0.1:{port}", prompt_id="p"))

    asyncio.run(scenario())


def test_a_node_without_a_title_or_class_type_is_named_by_its_id(capsys):
    from comfyui_krea.standalone.remote import Progress
    from comfyui_krea.standalone.terminal import Terminal

    progress = Progress({"5": {"inputs": {}}, "6": {"_meta": {"title": ""}, "class_type": "SaveImage"}}, Terminal())
    progress.message("executing", {"node": "5"})
    progress.message("executing", {"node": "6"})
    assert capsys.readouterr().err == "  5\n  SaveImage\n"


def test_a_progress_message_without_its_numbers_draws_an_empty_or_full_bar(capsys):
    from comfyui_krea.standalone.remote import Progress
    from comfyui_krea.standalone.terminal import Terminal

    progress = Progress({}, Terminal())
    progress.message("progress", {"max": 4})
    progress.message("progress", {"value": 1})
    assert capsys.readouterr().err == f"\r    [{'.' * 30}] 0/4\r    [{'#' * 30}] 1/1\n"


def test_the_token_and_headers_go_with_every_request(standin, tmp_path):
    image = tmp_path / "input.png"
    image.write_bytes(PNG)
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"))
    run(standin, i2i(), tmp_path / "out", {"7": image}, headers={"Authorization": "Bearer s3cret", "X-Team": "krea"})
    (prompt_id,) = standin.history
    assert [(method, path) for method, path, _ in standin.requests] == [
        ("POST", "/upload/image"), ("GET", "/ws"), ("POST", "/prompt"), ("GET", f"/history/{prompt_id}"),
        ("GET", "/view")]
    assert all((h["Authorization"], h["X-Team"]) == ("Bearer s3cret", "krea") for _, _, h in standin.requests)


def test_a_run_of_any_length_is_never_cut_short_and_its_socket_kept_alive(standin, tmp_path, monkeypatch):
    """No total time limit (aiohttp's default ends any request after 5 minutes: a long run would fail), a server
    that does not take the connection is given up after 30 s, and the socket is pinged every 30 s (proxies close
    idle ones)."""
    import aiohttp

    asked = []
    session, ws_connect = aiohttp.ClientSession, aiohttp.ClientSession.ws_connect

    def recording_session(*args, **kwargs):
        asked.append(("session", kwargs.get("timeout")))
        return session(*args, **kwargs)

    def recording_ws_connect(self, *args, **kwargs):
        asked.append(("socket", kwargs.get("heartbeat")))
        return ws_connect(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp, "ClientSession", recording_session)
    monkeypatch.setattr(session, "ws_connect", recording_ws_connect)
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"))
    run(standin, i2i(), tmp_path / "out")
    assert asked == [("session", aiohttp.ClientTimeout(total=None, sock_connect=30)), ("socket", 30)]


@pytest.mark.parametrize("answer, lines", [
    ({}, ["the server refused the workflow"]),  # a 400 in JSON with nothing in it
    ({"error": {"type": "x"}, "node_errors": {}}, ["the server refused the workflow"]),  # no message, no details
    ({"error": {"message": "Prompt has no outputs"}}, ["Prompt has no outputs"]),
    ({"error": {"message": "Unknown model: FLUX", "details": ""}}, ["Unknown model: FLUX"]),  # nothing cut off
    ({"error": {"details": "Node ID '#5'"}}, ["the server refused the workflow: Node ID '#5'"]),
], ids=["empty", "bare error", "message only", "message ending in X", "details only"])
def test_a_refusal_missing_parts_of_comfyuis_error_says_what_it_has(answer, lines):
    from comfyui_krea.standalone.remote import node_error_lines

    assert node_error_lines(answer, {}) == lines


def test_an_upload_the_server_kept_without_its_sub_folder_is_named_without_one(standin, tmp_path):
    image = tmp_path / "input.png"
    image.write_bytes(PNG)
    standin.flat_uploads = True
    standin.plan = saving(("krea", "krea_00001_.png", PNG, "output"))
    run(standin, i2i(), tmp_path / "out", {"7": image})
    assert standin.prompts[0]["prompt"]["7"]["inputs"]["image"] == "input.png"
    assert (standin.dirs["input"] / "input.png").read_bytes() == PNG
