"""`python -m comfyui_krea run WORKFLOW --server URL` against the real ComfyUI (../shared/comfyui, --cpu, https with
a local CA, started once per session by the fal_server fixture): both shipped workflows in UI and API form, a bad
value's node_errors line and exit 2, Ctrl-C mid-run, two clients at once."""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--width", "64", "--height", "48", "--steps", "2"]


@pytest.fixture(scope="module")
def comfy(fal_server, tmp_path_factory):
    server = fal_server("comfyui")
    image = tmp_path_factory.mktemp("run-server") / "input.png"
    Image.new("RGB", (80, 64), (200, 120, 40)).save(image)
    return {"url": server.url.removesuffix("/fal"), "ca": str(server.certs.ca_cert), "image": image,
            "log": server.log}


def krea_run(comfy: dict, workflow: str, output: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "SSL_CERT_FILE": comfy["ca"], "NO_PROXY": "127.0.0.1,localhost"}
    return subprocess.Popen([sys.executable, "-m", "comfyui_krea", "run", str(ROOT / workflow), "--server",
                             comfy["url"], "--output", str(output), *options], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def saved(out: str) -> list[Path]:
    return [Path(line.removeprefix("saved ")) for line in out.splitlines() if line.startswith("saved ")]


def get(comfy: dict, path: str) -> dict:
    context = ssl.create_default_context(cafile=comfy["ca"])
    with urllib.request.urlopen(comfy["url"] + path, context=context, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.mark.parametrize("workflow, seed, options", [
    ("workflows/krea_text_to_image.json", "3", SMALL),
    ("workflows/api/krea_text_to_image.json", "4", SMALL),
    ("workflows/krea_image_to_image.json", "5", ["--steps", "2"]),
    ("workflows/api/krea_image_to_image.json", "6", ["--steps", "2"]),
], ids=["ui text-to-image", "api text-to-image", "ui image-to-image", "api image-to-image"])
def test_shipped_workflows_run_on_the_server_and_their_images_are_downloaded(comfy, tmp_path, workflow, seed,
                                                                             options):
    # A seed of its own each: ComfyUI would serve a prompt it has run before from its cache, sampler included.
    if "image_to_image" in workflow:
        options = [*options, "--image", str(comfy["image"])]
    code, out, err = finished(krea_run(comfy, workflow, tmp_path, "--seed", seed, *options))
    assert code == 0, err + comfy["log"].read_text()[-2000:]
    (path,) = saved(out)
    assert path.parent == tmp_path / "krea" and path.is_file()  # the prefix krea/krea's sub-folder, as locally
    with Image.open(path) as img:
        assert img.size == ((64, 48) if "text_to_image" in workflow else (80, 64)) and img.format == "PNG"
        embedded = {key: json.loads(value) for key, value in img.info.items() if key in ("prompt", "workflow")}
    # The image carries what made it: the prompt, and a UI workflow with the run's values (dropped on ComfyUI, it
    # restores them); an API-format file has no UI form, and ComfyUI loads the prompt alone.
    (sampler_id,) = [k for k, n in embedded["prompt"].items() if n["class_type"] == "KreaSampler"]
    assert embedded["prompt"][sampler_id]["inputs"]["seed"] == int(seed)
    if workflow.startswith("workflows/api/"):
        assert "workflow" not in embedded
    else:
        sampler = next(n for n in embedded["workflow"]["nodes"] if n["type"] == "KreaSampler")
        assert sampler["widgets_values"][5] == int(seed)
    # The node reports come as the pack's websocket messages, not as outputs.
    assert "sampler: acceleration none: 2 of 2 steps computed fully" in out and "has_nsfw_concepts: [false]" in out
    assert "Krea Sampler" in err and "2/2" in err  # node names and the step bar


def test_downloads_never_replace_a_file(comfy, tmp_path):
    first = saved(finished(krea_run(comfy, "workflows/api/krea_text_to_image.json", tmp_path, *SMALL))[1])
    before = first[0].read_bytes()
    code, out, err = finished(krea_run(comfy, "workflows/api/krea_text_to_image.json", tmp_path, *SMALL,
                                       "--seed", "9"))
    assert code == 0, err
    (second,) = saved(out)
    assert second != first[0] and first[0].read_bytes() == before


def test_a_bad_value_gives_the_node_errors_line_and_exit_2(comfy, tmp_path):
    code, out, err = finished(krea_run(comfy, "workflows/api/krea_text_to_image.json", tmp_path,
                                       "--set", "3.num_inference_steps=99"))
    assert code == 2
    assert "error: the server refused the workflow:" in err and "node 3 (Krea Sampler):" in err and "99" in err
    assert list(tmp_path.iterdir()) == []
    code, _, err = finished(krea_run(comfy, "workflows/api/krea_text_to_image.json", tmp_path, "--steps", "99"))
    assert code == 2 and "num_inference_steps must be between 1 and 50" in err  # checked here, before asking


def test_ctrl_c_interrupts_the_servers_job_and_the_server_keeps_serving(comfy, tmp_path):
    process = krea_run(comfy, "workflows/api/krea_text_to_image.json", tmp_path, "--width", "512", "--height",
                       "512", "--steps", "50")
    deadline = time.time() + 300
    seen = ""
    while time.time() < deadline and "/50" not in seen:  # the step bar is running on the server
        seen += os.read(process.stderr.fileno(), 4096).decode(errors="replace")
    process.send_signal(signal.SIGINT)
    code, _, err = finished(process)
    assert code == 130, seen + err
    lines = (seen + err).replace("\r", "\n").split("\n")
    assert [line for line in lines if "error:" in line][0].startswith("error: interrupted")  # not behind the bar
    for _ in range(200):
        queue = get(comfy, "/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        time.sleep(0.1)
    assert not queue["queue_running"] and not queue["queue_pending"]
    interrupted = [h for h in get(comfy, "/history").values()
                   if any(m[0] == "execution_interrupted" for m in h["status"]["messages"])]
    assert interrupted, "the server's job was not interrupted"
    assert list(tmp_path.iterdir()) == []
    code, out, err = finished(krea_run(comfy, "workflows/api/krea_text_to_image.json", tmp_path, *SMALL))
    assert code == 0 and len(saved(out)) == 1, err


def test_two_clients_at_once_each_get_their_own_images(comfy, tmp_path):
    runs = [krea_run(comfy, "workflows/api/krea_text_to_image.json", tmp_path / name, *SMALL, "--seed", seed,
                     "--num-images", count) for name, seed, count in (("a", "11", "1"), ("b", "12", "2"))]
    results = [finished(p) for p in runs]
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    files_a, files_b = saved(results[0][1]), saved(results[1][1])
    assert len(files_a) == 1 and len(files_b) == 2
    assert {f.parent.parent.name for f in files_a} == {"a"} and {f.parent.parent.name for f in files_b} == {"b"}
    with Image.open(files_a[0]) as a, Image.open(files_b[0]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # seed 11 and seed 12


def test_token_and_headers_for_a_comfyui_behind_a_proxy():
    from comfyui_krea.standalone.cli import parse_args, server_headers
    from comfyui_krea.standalone.runner import WorkflowError

    args = parse_args(["run", "w.json", "--server", "https://comfy.example", "--token", "s3cret",
                       "--header", "X-Team: krea", "--header", "Cookie:a=b"])
    assert server_headers(args) == {"Authorization": "Bearer s3cret", "X-Team": "krea", "Cookie": "a=b"}
    with pytest.raises(WorkflowError, match="expected NAME:VALUE"):
        server_headers(parse_args(["run", "w.json", "--server", "http://x", "--header", "no colon"]))


def test_server_options_are_refused_without_a_server_and_local_ones_with_it(tmp_path, capsys):
    from comfyui_krea.standalone.cli import main

    assert main(["run", str(ROOT / "workflows/api/krea_text_to_image.json"), "--demo", "--token", "x"]) == 2
    assert "--token/--header is not used by this workflow: it needs --server" in capsys.readouterr().err
    assert main(["run", str(ROOT / "workflows/api/krea_text_to_image.json"), "--server", "http://127.0.0.1:9",
                 "--demo"]) == 2
    assert "--demo cannot be used with --server" in capsys.readouterr().err
    assert main(["run", str(ROOT / "workflows/api/krea_text_to_image.json"), "--server", "http://127.0.0.1:9"]) == 2
    assert "cannot reach ComfyUI at http://127.0.0.1:9" in capsys.readouterr().err
