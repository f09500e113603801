"""`python -m comfyui_krea run WORKFLOW --server URL` as a command (cli.main in this process) against the stand-in
ComfyUI 0.3.64 (comfyui_http_standin.py) served from a thread (`serving_in_thread`: the command's asyncio.run
needs this thread's loop free): the options reach the queued prompt, the input image
and mask are uploaded, a UI workflow is converted with the server's own node definitions and embedded in the
images, the images land in --output (./output without it), the printed lines, the URL forms taken, and the refusals
that come before the server is asked to run anything. tests/test_run_server.py runs the same against the real
ComfyUI."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("aiohttp", reason="run --server needs aiohttp: pip install -e '.[serve]'")

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402
from comfyui_http_standin import LIMIT, PNG, StandInComfyUI, saving  # noqa: E402

from comfyui_krea.nodes import NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from comfyui_krea.sampling.parameters import GUIDANCE_SCALE, MAX_SIDE, NUM_INFERENCE_STEPS  # noqa: E402
from comfyui_krea.standalone.cli import main  # noqa: E402
from comfyui_krea.standalone.node_classes import PACK_CLASSES  # noqa: E402
from comfyui_krea.standalone.ui_workflow import local_definitions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "workflows" / "api"
DEFINITIONS = local_definitions(PACK_CLASSES, NODE_DISPLAY_NAME_MAPPINGS)  # what ComfyUI serves for these nodes


@contextlib.contextmanager
def serving_in_thread(standin: StandInComfyUI, prefix: str = "") -> Iterator[str]:
    """The stand-in served from an event loop in a thread of its own (its routes under `prefix`, as behind a
    proxy), for code that runs its own event loop; yields its URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = standin.application()
    if prefix:
        outer = web.Application()
        outer.add_subapp(prefix, app)
        app = outer

    async def start() -> TestServer:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(LIMIT)
    try:
        yield str(server.make_url(prefix)).rstrip("/")
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(LIMIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(LIMIT)
        loop.close()


@pytest.fixture
def standin(tmp_path) -> StandInComfyUI:
    server = StandInComfyUI(tmp_path / "comfyui", set(DEFINITIONS), definitions=DEFINITIONS)
    server.plan = saving(("krea", "krea_00001_.png", PNG, "output"))
    return server


@pytest.fixture
def pictures(tmp_path) -> tuple[Path, Path]:
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(image)
    Image.new("L", (64, 48), 255).save(mask)
    return image, mask


def saved(stdout: str) -> list[Path]:
    return [Path(line.removeprefix("saved ")) for line in stdout.splitlines() if line.startswith("saved ")]


def test_the_options_reach_the_queued_prompt_and_the_images_come_into_output(standin, pictures, tmp_path, capsys):
    image, mask = pictures
    with serving_in_thread(standin) as url:
        code = main(["run", str(API / "krea_inpainting.json"), "--server", url, "--output", str(tmp_path / "out"),
                     "--image", str(image), "--mask", str(mask), "--prompt", "a red fox", "--seed", "7",
                     "--steps", "3", "--strength", "0.5", "--set", "6.filename_prefix=fox"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [(u["filename"], u["subfolder"], u["data"]) for u in standin.uploads] == [
        ("photo.png", "krea-cli", image.read_bytes()), ("mask.png", "krea-cli", mask.read_bytes())]
    (body,) = standin.prompts
    expected = json.loads((API / "krea_inpainting.json").read_text())
    expected["2"]["inputs"]["prompt"] = "a red fox"
    expected["3"]["inputs"].update(seed=7, num_inference_steps=3, strength=0.5)
    expected["6"]["inputs"]["filename_prefix"] = "fox"
    expected["7"]["inputs"]["image"] = "krea-cli/photo.png"
    expected["9"]["inputs"]["image"] = "krea-cli/mask.png"
    assert body["prompt"] == expected
    assert "extra_data" not in body  # an API workflow has no UI form to embed: the prompt alone is
    assert out.splitlines() == ["sampler: 2 of 2 steps computed",
                                f"saved {tmp_path / 'out' / 'krea' / 'krea_00001_.png'}"]
    assert saved(out)[0].read_bytes() == PNG
    assert "  Krea Sampler" in err.splitlines() and err.splitlines()[-1].startswith("done in ")


def test_without_output_the_images_come_into_the_output_folder_here(standin, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with serving_in_thread(standin) as url:
        assert main(["run", str(API / "krea_text_to_image.json"), "--server", url]) == 0
    assert saved(capsys.readouterr().out) == [Path("output") / "krea" / "krea_00001_.png"]
    assert (tmp_path / "output" / "krea" / "krea_00001_.png").read_bytes() == PNG


def test_a_ui_workflow_is_converted_with_the_servers_definitions_and_embedded_with_the_runs_values(
        standin, pictures, tmp_path, capsys):
    image, _ = pictures
    with serving_in_thread(standin) as url:
        code = main(["run", str(ROOT / "workflows" / "krea_image_to_image.json"), "--server", url,
                     "--output", str(tmp_path / "out"), "--image", str(image), "--seed", "11"])
    assert code == 0, capsys.readouterr().err
    (body,) = standin.prompts
    types = {node["class_type"] for node in body["prompt"].values()}
    assert types == {"KreaModelLoader", "KreaTextEncode", "KreaSampler", "KreaDecode", "KreaSafetyCheck",
                     "KreaSaveImage", "LoadImage", "KreaEncodeImage"}
    (sampler,) = [node for node in body["prompt"].values() if node["class_type"] == "KreaSampler"]
    (loader,) = [node for node in body["prompt"].values() if node["class_type"] == "LoadImage"]
    assert sampler["inputs"]["seed"] == 11 and loader["inputs"]["image"] == "krea-cli/photo.png"
    nodes = body["extra_data"]["extra_pnginfo"]["workflow"]["nodes"]
    (ui_sampler,) = [node for node in nodes if node["type"] == "KreaSampler"]
    (ui_loader,) = [node for node in nodes if node["type"] == "LoadImage"]
    assert 11 in ui_sampler["widgets_values"] and "krea-cli/photo.png" in ui_loader["widgets_values"]


def test_a_node_type_the_server_lacks_is_named_before_anything_is_queued(tmp_path, capsys):
    lacking = {k: v for k, v in DEFINITIONS.items() if k not in ("KreaSafetyCheck", "KreaDecode")}
    standin = StandInComfyUI(tmp_path / "comfyui", set(lacking), definitions=lacking)
    with serving_in_thread(standin) as url:
        assert main(["run", str(API / "krea_text_to_image.json"), "--server", url]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: the server has no node type 'KreaDecode', 'KreaSafetyCheck' (a missing custom node pack?)")
    assert standin.prompts == [] and [path for _, path, _ in standin.requests] == ["/object_info"]


@pytest.mark.parametrize("prefix, given", [("", "{url}/"), ("/lab/X/", "{url}"), ("/lab/X/", "{url}/")],
                         ids=["trailing slash", "behind a proxy under a path", "path and trailing slash"])
def test_the_server_url_is_taken_with_or_without_a_trailing_slash(standin, tmp_path, capsys, prefix, given):
    with serving_in_thread(standin, prefix) as url:
        code = main(["run", str(API / "krea_text_to_image.json"), "--server", given.format(url=url),
                     "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert [path.removeprefix(prefix.rstrip("/"))
            for _, path, _ in standin.requests][:3] == ["/object_info", "/ws", "/prompt"]


def test_an_https_url_is_taken_and_an_unreachable_one_named(capsys):
    assert main(["run", str(API / "krea_text_to_image.json"), "--server", "https://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: cannot reach ComfyUI at https://127.0.0.1:9: ")


@pytest.mark.parametrize("url", ["127.0.0.1:8188", "ftp://127.0.0.1:8188", "HTTP//x"])
def test_a_server_url_without_http_or_https_is_refused(url, capsys):
    assert main(["run", str(API / "krea_text_to_image.json"), "--server", url]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --server {url!r}: expected http://HOST:PORT or https://HOST:PORT")


@pytest.mark.parametrize("options, named", [
    (["--models", "m"], "--models"), (["--tokenizers", "t"], "--tokenizers"),
    (["--no-memory-check"], "--no-memory-check"), (["--demo", "--models", "m"], "--demo, --models")])
def test_options_of_a_local_run_are_refused_with_a_server_by_name(options, named, capsys):
    assert main(["run", str(API / "krea_text_to_image.json"), "--server", "http://127.0.0.1:9", *options]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {named} cannot be used with --server: the server runs its own models")


def test_the_token_and_headers_go_with_the_definitions_request_too(standin, tmp_path, capsys):
    with serving_in_thread(standin) as url:
        code = main(["run", str(API / "krea_text_to_image.json"), "--server", url, "--output", str(tmp_path / "o"),
                     "--token", "s3cret", "--header", "X-Team: krea"])
    assert code == 0, capsys.readouterr().err
    assert standin.requests[0][1] == "/object_info"
    assert all((h.get("Authorization"), h.get("X-Team")) == ("Bearer s3cret", "krea") for _, _, h in standin.requests)


def test_the_definitions_request_gives_up_on_a_silent_server_after_a_minute(standin, monkeypatch, tmp_path, capsys):
    """ComfyUI answers /object_info in seconds; a server that takes the connection and never answers is given up
    after 60 s (urllib's default is to wait forever)."""
    import urllib.request

    timeouts = []
    urlopen = urllib.request.urlopen

    def recording_urlopen(request, *args, **kwargs):
        timeouts.append(kwargs.get("timeout", args[1] if len(args) > 1 else None))
        return urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", recording_urlopen)
    with serving_in_thread(standin) as url:
        assert main(["run", str(API / "krea_text_to_image.json"), "--server", url, "--output", str(tmp_path)]) == 0
    assert timeouts == [60]


@pytest.mark.parametrize("options, error", [
    (["--steps", "99"], f"num_inference_steps must be between 1 and {NUM_INFERENCE_STEPS.max}, got 99."),
    (["--guidance", "0.5"], f"guidance_scale must be between {GUIDANCE_SCALE.min} and {GUIDANCE_SCALE.max}, got 0.5."),
    (["--width", "100"], f"width must be a multiple of 16 between 16 and {MAX_SIDE}, got 100.")])
def test_a_value_out_of_range_is_refused_before_the_server_is_asked_anything(standin, capsys, options, error):
    with serving_in_thread(standin) as url:
        assert main(["run", str(API / "krea_text_to_image.json"), "--server", url, *options]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {error}"
    assert standin.requests == []


def test_a_node_written_without_inputs_is_queued_with_empty_ones(standin, tmp_path, capsys):
    """A hand-written API workflow may leave out "inputs" of a node; ComfyUI's validation reads them as a mapping."""
    prompt = json.loads((API / "krea_text_to_image.json").read_text())
    del prompt["5"]["inputs"], prompt["1"]["inputs"]
    workflow = tmp_path / "hand_written.json"
    workflow.write_text(json.dumps(prompt))
    with serving_in_thread(standin) as url:
        code = main(["run", str(workflow), "--server", url, "--output", str(tmp_path / "out"),
                     "--set", '1.weight_dtype="fp8_e4m3fn"'])
    assert code == 0, capsys.readouterr().err
    (body,) = standin.prompts
    assert body["prompt"]["5"]["inputs"] == {} and body["prompt"]["1"]["inputs"] == {"weight_dtype": "fp8_e4m3fn"}
