"""fal's Krea LoRA endpoints (fal-ai/flux-krea-lora, .../image-to-image, .../inpainting, .../stream) with the real,
unchanged clients (Python fal-client; JS @fal-ai/client when node and npm are there), against both servers of the
pack: `serve` over a models folder, and the real ComfyUI
(COMFYUI_DIR) whose own LoraLoaderModelOnly merges the LoRAs there.

A LoRA is given by file name in the loras folder and by URL (a file server this test starts; the real address
guard approves `loras.example` through a fake resolver, tests/fal_protocol/lora_dns); two LoRAs with scales change
the image, and `serve`'s image equals the command line's `run --lora` with the same LoRAs, bit for bit; a URL is
fetched once; inpainting keeps the unmasked region (measured); the stream yields previews, then the result; and
every hostile LoRA is a 422 on loras[0].path before anything is queued.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fal_protocol.lora_servers import LoraFileServer, lora_comfyui, lora_serve
from fal_protocol.servers import API_KEY, Server, failed, ok

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "tests" / "fal_protocol" / "lora_client.py"
JS_DIR = ROOT / "tests" / "fal_protocol" / "js"


def js_client_ready() -> str | None:
    """Why the JS client cannot run here (None: it can), installing the pinned client first when needed."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not on PATH"
    pinned = json.loads((JS_DIR / "package.json").read_text())["dependencies"]["@fal-ai/client"]
    manifest = JS_DIR / "node_modules" / "@fal-ai" / "client" / "package.json"
    if not manifest.is_file() or json.loads(manifest.read_text())["version"] != pinned:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, text=True,
                              timeout=600)
        if done.returncode != 0:
            return f"npm ci failed: {done.stderr[-500:]}"
    return None


def png_data_uri(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_js_client(server: Server, files_url: str, image: np.ndarray) -> dict:
    mask = np.zeros(image.shape, np.uint8)
    mask[:, : image.shape[1] // 2] = 255
    env = {**os.environ, "FAL_KEY": API_KEY, "NODE_EXTRA_CA_CERTS": str(server.certs.ca_cert),
           "NO_PROXY": "127.0.0.1,localhost", "LORA_IMAGE": png_data_uri(image), "LORA_MASK": png_data_uri(mask)}
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        env.pop(name, None)
    done = subprocess.run(["node", str(JS_DIR / "lora_scenarios.mjs"), server.url, files_url], cwd=JS_DIR,
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_lora_client(server: Server, work: Path, files_url: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FAL_KEY": API_KEY, "SSL_CERT_FILE": str(server.certs.ca_cert), "FAL_HOME_DIR": str(work)}
    done = subprocess.run([sys.executable, str(CLIENT), server.address, str(work), files_url], capture_output=True,
                          text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["serve", "comfyui"])
def lora_run(request, tmp_path_factory):
    """(server name, the client's report, the file server, the served folder, (models, tokenizers) for serve)."""
    work = tmp_path_factory.mktemp(f"fal-lora-{request.param}")
    if request.param == "comfyui" and not os.environ.get("COMFYUI_DIR"):
        if os.environ.get("CI"):
            pytest.fail("the ComfyUI server needs COMFYUI_DIR")
        pytest.skip("the ComfyUI routes need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set COMFYUI_DIR")
    if request.param == "serve":
        context = lora_serve(work)
    else:
        context = lora_comfyui(work, os.environ["COMFYUI_DIR"])
    with context as started:
        server, folders = (started[0], started[1:]) if isinstance(started, tuple) else (started, None)
        loras = (folders[0] if folders else work / "base" / "models") / "loras"
        files = LoraFileServer(loras)
        files_url = f"http://loras.example:{files.port}"
        try:
            report = run_lora_client(server, work / "client", files_url)
            not_ready = js_client_ready()
            if not_ready is None:
                report["_js"] = run_js_client(server, files_url, np.asarray(ok(report, "input_image"), np.uint8))
                report["_js"]["_server"] = server
            else:
                report["_js"] = not_ready
        finally:
            files.close()
        report["_server"] = server
        yield request.param, report, files, loras, folders


def image(report: dict, name: str) -> np.ndarray:
    return np.asarray(ok(report, name)["images"][0], dtype=np.float64)


def test_two_loras_with_scales_change_the_image(lora_run):
    _, report, *_ = lora_run
    none, two, one = image(report, "t2i_none"), image(report, "t2i_two"), image(report, "t2i_one")
    assert none.shape == two.shape == (48, 64, 3)
    assert np.abs(two - none).mean() > 1.0 and np.abs(two - one).mean() > 0.5


def test_a_lora_by_url_is_the_file_fetched_once_into_the_cache(lora_run):
    _, report, files, loras, _ = lora_run
    assert np.array_equal(image(report, "t2i_url"), image(report, "t2i_two"))
    assert np.array_equal(image(report, "t2i_url_again"), image(report, "t2i_two"))
    assert files.gets["/style.safetensors"] == 1  # the second request found it in the cache
    cached = sorted(p.name for p in (loras / "fal-cache").glob("*.safetensors"))
    assert len(cached) == 1 and not list((loras / "fal-cache").glob(".part-*"))
    # refused (the pickle after its fetch, /huge by its Content-Length), never cached: each request asks again
    assert files.gets["/pickled.safetensors"] == 1 and files.gets["/huge"] >= 1


def test_serve_makes_what_the_command_line_makes_with_the_same_loras(lora_run, tmp_path):
    name, report, _, _, folders = lora_run
    if name != "serve":
        pytest.skip("the command line runs the pack's own LoRA engine, as serve does")
    models, tokenizers = folders
    done = subprocess.run(
        [sys.executable, "-m", "comfyui_krea", "run", str(ROOT / "workflows" / "api" / "krea_text_to_image.json"),
         "--models", str(models), "--tokenizers", str(tokenizers), "--output", str(tmp_path), "--prompt",
         "a lighthouse at dusk", "--seed", "5", "--width", "64", "--height", "48", "--steps", "3", "--guidance",
         "3.5", "--format", "png", "--lora", "style.safetensors:0.7", "--lora", "sub/detail.safetensors:0.4",
         "--no-memory-check"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    saved = sorted(tmp_path.rglob("*.png"))
    assert len(saved) == 1
    assert np.array_equal(np.asarray(Image.open(saved[0]).convert("RGB"), dtype=np.float64), image(report, "t2i_two"))


def test_image_to_image_with_loras_keeps_the_input_size(lora_run):
    _, report, *_ = lora_run
    out = ok(report, "i2i_two")
    assert np.asarray(out["images"][0]).shape == (48, 64, 3) and out["seed"] == 5


def test_inpainting_keeps_the_unmasked_region(lora_run):
    """Two seeds repaint the left half (white in the mask) differently and keep the right half: far from the
    boundary the kept region differs between them much less than the repainted one."""
    _, report, *_ = lora_run
    a, b = image(report, "inpaint_seed5"), image(report, "inpaint_seed6")
    repainted = np.abs(a[:, :24] - b[:, :24]).mean()
    kept = np.abs(a[:, 40:] - b[:, 40:]).mean()
    print(f"inpainting: mean |seed 5 - seed 6| repainted {repainted:.2f}, kept {kept:.2f} (of 255)")
    assert repainted > 2.0 and kept < repainted / 4


def test_the_stream_yields_previews_then_the_result(lora_run):
    _, report, *_ = lora_run
    events = ok(report, "stream")
    previews, final = events[:-1], events[-1]
    assert len(previews) >= 1
    for event in previews:
        assert event["images"][0]["url"].startswith("data:image/jpeg;base64,") and event["seed"] == 5
    assert final["seed"] == 5 and final["has_nsfw_concepts"] == [False] and "inference" in final["timings"]
    assert np.asarray(final["images"][0]).shape == (48, 64, 3)


@pytest.mark.parametrize("name, says", [
    ("pickle", "safetensors"), ("truncated", ""), ("sdxl", "not a FLUX.1 LoRA"), ("wide", ""),
    ("escape", "leaves the model folder"), ("absolute", "leaves the model folder"), ("missing", "no LoRA named"),
    ("huge_url", "more than the"), ("pickle_url", ""), ("file_url", "file://")])
def test_hostile_loras_are_refused_before_sampling(lora_run, name, says):
    _, report, *_ = lora_run
    error = failed(report, f"hostile_{name}")
    assert error["status_code"] == 422, error
    assert "loras" in error["str"] and says in error["str"], error["str"]


def js_report(report: dict) -> dict:
    js = report["_js"]
    if isinstance(js, str):
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"the JS client cannot run: {js}")
    return js


def js_pixels(url: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def test_the_js_client_runs_every_lora_endpoint(lora_run):
    _, report, *_ = lora_run
    js = js_report(report)
    none, two = js_pixels(ok(js, "t2i_none")["images"][0]["url"]), js_pixels(ok(js, "t2i_two")["images"][0]["url"])
    assert np.array_equal(two, image(report, "t2i_two"))  # the same request as Python's gives the same image
    assert np.abs(two - none).mean() > 1.0
    assert np.array_equal(js_pixels(ok(js, "t2i_url")["images"][0]["url"]), two)
    for name in ("i2i", "inpainting"):
        assert ok(js, name)["images"][0]["width"] == 64 and ok(js, name)["seed"] == 5


def test_the_js_clients_fal_stream_gets_previews_then_the_result(lora_run):
    _, report, *_ = lora_run
    stream = ok(js_report(report), "stream")
    assert len(stream["events"]) >= 2 and stream["events"][0]["url"].startswith("data:image/jpeg;base64,")
    assert stream["events"][-1]["keys"] == stream["done"]["keys"]  # done() resolves with the last event: the output
    assert "has_nsfw_concepts" in stream["done"]["keys"] and stream["done"]["seed"] == 5
    assert js_pixels(stream["done"]["url"]).shape == (48, 64, 3) and stream["requestId"]


@pytest.mark.parametrize("name", ["hostile_escape", "hostile_huge_url", "hostile_pickle"])
def test_the_js_client_gets_a_validation_error_for_a_hostile_lora(lora_run, name):
    _, report, *_ = lora_run
    error = failed(js_report(report), name)
    assert error["status"] == 422 and error["name"] == "ValidationError"
    assert error["fieldErrors"][0]["loc"] == ["body", "loras", 0, "path"]
