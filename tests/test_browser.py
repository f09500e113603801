"""The pack in ComfyUI's own frontend (the comfyui-frontend-package the ComfyUI snapshot installs), in a real browser:
Debian's Chromium driven by playwright-core (pinned with its lock file in tests/browser; no browser download).

One `node tests/browser/frontend_scenarios.mjs` run against the real ComfyUI (plain http, --cpu, the pack in
custom_nodes, small models) converts UI workflows with bypassed, muted and rerouted nodes
(tests/ui_conversion_cases.py) with the frontend's graphToPrompt, and goes through each shipped workflow: load it
(no missing node types, every link as in the file, graphToPrompt captured), make it small through the sampler's
widgets, queue it with the Run button (the image and the badges), copy it as a fal request, change the widgets and
paste the request back, and paste a request with fields that have no widget. Each test asserts on one part of its
report. Screenshots of each state, the captured graphToPrompt outputs, the server's object_info and the report are
kept in KREA_ARTIFACTS (default test-artifacts/browser).

Needs ComfyUI (COMFYUI_DIR, skips without it as every host test), Chromium (/usr/bin/chromium: `apt-get install -y
chromium`) and node (>= 20) with npm: skips without those two, except under CI (which installs them), where the
tests fail instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from ui_conversion_cases import CASES, case

ROOT = Path(__file__).resolve().parent.parent
BROWSER_DIR = Path(__file__).resolve().parent / "browser"
SCRIPT = BROWSER_DIR / "frontend_scenarios.mjs"
WORKFLOWS = ("krea_text_to_image", "krea_image_to_image")
ARTIFACTS = Path(os.environ.get("KREA_ARTIFACTS") or ROOT / "test-artifacts" / "browser")
UPLOAD_SIZE = (96, 64)  # the image-to-image input: not square, so the made size shows where it came from
SMALL_SIDE = 64  # what the scenarios set the sampler to (frontend_scenarios.mjs SMALL)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# What a paste cannot restore because the request does not carry it (frontend_scenarios.mjs CHANGED sets them).
NOT_CARRIED = {"krea_text_to_image": {"strength"}, "krea_image_to_image": {"image_size", "width", "height"}}


def chromium() -> str | None:
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")


def node_major() -> int:
    if shutil.which("node") is None:
        return 0
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    return int(version.lstrip("v").split(".")[0] or 0)


if not os.environ.get("COMFYUI_DIR"):  # as every host test: CI sets it where ../shared/comfyui is
    pytest.skip("the browser tests need ComfyUI: run `../shared/comfyui/setup.sh DIR` and set COMFYUI_DIR",
                allow_module_level=True)
MISSING = [need for need, present in (
    ("Chromium at /usr/bin/chromium or on PATH (Debian: `apt-get install -y chromium`)", chromium()),
    ("node >= 20 and npm on PATH", node_major() >= 20 and shutil.which("npm")),
) if not present]
if MISSING and not os.environ.get("CI"):  # CI installs them: there each test fails instead (fixture below)
    pytest.skip(f"the browser tests need {'; '.join(MISSING)}", allow_module_level=True)


def pinned_version() -> str:
    return json.loads((BROWSER_DIR / "package.json").read_text())["dependencies"]["playwright-core"]


def installed_version() -> str | None:
    manifest = BROWSER_DIR / "node_modules" / "playwright-core" / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.is_file() else None


@pytest.fixture(scope="module")
def playwright_installed() -> None:
    """tests/browser/node_modules with the pinned playwright-core, installed from the lock file once."""
    if MISSING:
        pytest.fail(f"the browser tests need {'; '.join(MISSING)}", pytrace=False)
    if installed_version() == pinned_version():
        return
    command = ["npm", "ci", "--no-audit", "--no-fund"]
    done = subprocess.run(command, cwd=BROWSER_DIR, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"`{' '.join(command)}` in {BROWSER_DIR} failed (no npm registry?):\n{done.stderr[-2000:]}")
    assert installed_version() == pinned_version(), "npm installed another playwright-core than package.json pins"


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def comfyui_http(work: Path, comfyui_dir: str) -> Iterator[tuple[str, Path, Path]]:
    """The real ComfyUI on plain http, --cpu, the pack in custom_nodes, the shipped workflows' model files (small
    ones) and input image; yields (base URL, base directory, log file)."""
    from fal_protocol.servers import free_port, running, write_comfyui_models

    base = work / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "krea").symlink_to(ROOT)
    write_comfyui_models(base / "models")
    (base / "input").mkdir()
    Image.new("RGB", (SMALL_SIDE, SMALL_SIDE), (90, 60, 30)).save(base / "input" / "example.png")
    settings = base / "user" / "default" / "comfy.settings.json"  # no first-run template dialog over the canvas
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(Path(comfyui_dir) / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
               str(port), "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
    log_path = work / "comfyui.log"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with running(command, env, Path(comfyui_dir), f"{url}/system_stats", None, log_path):
        yield url, base, log_path


@pytest.fixture(scope="module")
def browser(playwright_installed, tmp_path_factory) -> dict:
    """The scenarios' report, with the server's object_info, base directory and log; artifacts written."""
    work = tmp_path_factory.mktemp("browser")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "failure.png").unlink(missing_ok=True)
    upload = work / "upload.png"
    Image.new("RGB", UPLOAD_SIZE, (40, 120, 200)).save(upload)
    with comfyui_http(work, os.environ["COMFYUI_DIR"]) as (url, base, log):
        object_info = get_json(f"{url}/object_info")
        conversions = {}
        for name in CASES:
            conversions[name] = str(work / f"conversion-{name}.json")
            Path(conversions[name]).write_text(json.dumps(case(name).data))
        config = {"url": url, "artifacts": str(ARTIFACTS), "chromium": chromium(),
                  "userDataDir": str(work / "chromium"), "uploadImage": str(upload),
                  "workflows": {name: str(ROOT / "workflows" / f"{name}.json") for name in WORKFLOWS},
                  "conversions": conversions}
        (work / "config.json").write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        done = subprocess.run(["node", str(SCRIPT), str(work / "config.json")], cwd=BROWSER_DIR, capture_output=True,
                              text=True, timeout=600, env={**env, "NO_PROXY": "127.0.0.1,localhost"})
        lines = done.stdout.strip().splitlines()
        assert done.returncode == 0 and lines, f"node exited {done.returncode}:\n{done.stderr[-4000:]}"
        report = json.loads(lines[-1])
    (ARTIFACTS / "report.json").write_text(json.dumps(report, indent=1))
    (ARTIFACTS / "object_info.json").write_text(json.dumps(object_info))
    for name, entry in report["workflows"].items():
        if "prompt" in entry:
            (ARTIFACTS / f"{name}.graph_to_prompt.json").write_text(json.dumps(entry["prompt"], indent=1))
        if "small" in entry:
            (ARTIFACTS / f"{name}-small.workflow.json").write_text(json.dumps(entry["small"]["workflow"], indent=1))
            (ARTIFACTS / f"{name}-small.graph_to_prompt.json").write_text(
                json.dumps(entry["small"]["prompt"], indent=1))
    assert report.get("ok"), f"{report.get('error')}\nsee {ARTIFACTS}\n{log.read_text()[-3000:]}"
    return {"report": report, "object_info": object_info, "base": base}


def shipped(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def widgets(object_info: dict, workflow: dict, class_type: str) -> dict:
    """The widget values of the workflow's node of `class_type`, named in the server's input_order (the widget
    inputs, control_after_generate after a seed)."""
    definition = object_info[class_type]
    names = []
    for group in ("required", "optional"):
        for name in definition.get("input_order", {}).get(group, []):
            kind, *rest = definition["input"][group][name]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                names.append(name)
                if rest and rest[0].get("control_after_generate"):
                    names.append("control_after_generate")
    node = next(n for n in workflow["nodes"] if n["type"] == class_type)
    assert len(names) == len(node["widgets_values"]), class_type
    return dict(zip(names, node["widgets_values"]))


def expected_request(object_info: dict, workflow: dict, image_to_image: bool) -> dict:
    """The fal request of a shipped workflow, field by field from its widgets."""
    sampler = widgets(object_info, workflow, "KreaSampler")
    body = {"prompt": widgets(object_info, workflow, "KreaTextEncode")["prompt"]}
    if not image_to_image:
        body["image_size"] = sampler["image_size"] if sampler["image_size"] != "custom" else \
            {"width": sampler["width"], "height": sampler["height"]}
    body |= {k: sampler[k] for k in ("num_inference_steps", "guidance_scale", "seed", "num_images", "acceleration")}
    if image_to_image:
        body["strength"] = sampler["strength"]
    body["enable_safety_checker"] = widgets(object_info, workflow, "KreaSafetyCheck")["enable_safety_checker"]
    body["output_format"] = widgets(object_info, workflow, "KreaSaveImage")["output_format"]
    return body


@pytest.mark.parametrize("name", WORKFLOWS)
def test_shipped_workflow_loads_with_no_missing_nodes_and_intact_links(name, browser):
    entry, workflow = browser["report"]["workflows"][name], shipped(name)
    assert entry["missing"] == []  # the frontend's afterConfigureGraph(missingNodeTypes)
    assert sorted((n["id"], n["type"]) for n in entry["nodes"]) == sorted((n["id"], n["type"])
                                                                          for n in workflow["nodes"])
    assert all(n["registered"] and not n["hasErrors"] for n in entry["nodes"]), entry["nodes"]
    assert sorted(map(tuple, entry["links"])) == sorted(map(tuple, workflow["links"]))


def comparable(prompt: dict) -> dict:
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


@pytest.mark.parametrize("state", ["shipped", "small"])
@pytest.mark.parametrize("name", WORKFLOWS)
def test_to_api_matches_the_frontends_graph_to_prompt(name, state, browser):
    """standalone.ui_workflow.to_api converts the UI workflow as the real frontend's graphToPrompt does: the shipped
    file, and the graph the scenarios queued (custom size, an uploaded image), as the page serialized it."""
    from comfyui_krea.standalone.ui_workflow import to_api

    entry = browser["report"]["workflows"][name]
    workflow, captured = (shipped(name), entry["prompt"]) if state == "shipped" else \
        (entry["small"]["workflow"], entry["small"]["prompt"])
    assert comparable(to_api(workflow, browser["object_info"])) == comparable(captured)


@pytest.mark.parametrize("name", CASES)
def test_to_api_resolves_bypassed_muted_and_rerouted_nodes_as_the_frontend(name, browser):
    """Bypassed nodes with inputs of several types, chains of them, reroutes through them, muted sources: the pack's
    converter on the file and on the page's own serialization of it equals the frontend's graphToPrompt."""
    from comfyui_krea.standalone.ui_workflow import to_api

    entry = browser["report"]["conversions"][name]
    expected = comparable(entry["prompt"])
    assert comparable(to_api(case(name).data, browser["object_info"])) == expected
    assert comparable(to_api(entry["workflow"], browser["object_info"])) == expected


@pytest.mark.parametrize("name", WORKFLOWS)
def test_queueing_from_the_page_makes_the_image_and_the_badges(name, browser):
    entry = browser["report"]["workflows"][name]
    history = entry["history"]
    assert history["status"]["status_str"] == "success", history["status"]
    types = {node_id: node["class_type"] for node_id, node in entry["small"]["prompt"].items()}
    outputs = {types[node_id]: ui for node_id, ui in history["outputs"].items()}
    (image,) = outputs["KreaSaveImage"]["images"]
    path = browser["base"] / "output" / image["subfolder"] / image["filename"]
    with Image.open(path) as saved:
        assert saved.size == (UPLOAD_SIZE if name == "krea_image_to_image" else (SMALL_SIDE, SMALL_SIDE))

    (sampler,) = outputs["KreaSampler"]["krea_report"]
    badges = [badge["text"] for badge in entry["badges"]["KreaSampler"]]
    assert badges[:3] == [f"{sampler['steps']} steps", f"{sampler['computed']} computed",
                          f"{sampler['reused']} reused"]
    assert f"made {sampler['width']}×{sampler['height']}" in badges and badges[-1].endswith(" s")
    (safety,) = outputs["KreaSafetyCheck"]["krea_report"]
    flags = safety["has_nsfw_concepts"]
    flagged = sum(map(bool, flags))
    badges = [badge["text"] for badge in entry["badges"]["KreaSafetyCheck"]]
    assert badges[0] == (f"has_nsfw_concepts: {flagged} of {len(flags)}" if flagged else
                         f"has_nsfw_concepts: none of {len(flags)}")
    assert len(flags) == 1 and badges[-1].endswith(" s")

    shots = [Path(p) for p in entry["screenshots"]]
    assert [p.name for p in shots] == [f"{name}-{state}.png" for state in (
        "1-loaded", "2-ran", "3-changed", "4-pasted", "5-paste-dialog", "6-unmapped-fields", "7-refused")]
    assert all(p.stat().st_size > 10_000 for p in shots)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_copy_as_fal_request_gives_the_graphs_values(name, browser):
    entry, workflow = browser["report"]["workflows"][name], shipped(name)
    image_to_image = name == "krea_image_to_image"
    expected = expected_request(browser["object_info"], workflow, image_to_image)
    assert entry["copiedShipped"] == expected
    assert list(entry["copiedShipped"]) == list(expected)
    small = expected | {"num_inference_steps": 2}
    if not image_to_image:
        small["image_size"] = {"width": SMALL_SIDE, "height": SMALL_SIDE}
    assert entry["copiedSmall"] == small
    assert entry["copyMessage"].startswith("Copied as fal request")
    assert ("image_url" in entry["copyMessage"]) == image_to_image


@pytest.mark.parametrize("name", WORKFLOWS)
def test_paste_fal_request_restores_the_copied_values(name, browser):
    entry = browser["report"]["workflows"][name]
    small, changed, pasted = entry["smallValues"], entry["changedValues"], entry["pastedValues"]
    types = ("KreaSampler", "KreaTextEncode", "KreaSafetyCheck", "KreaSaveImage")
    assert all(changed[t] != small[t] for t in types)
    for class_type in types:  # the widgets set before the run (running adds an image preview to the save node)
        skip = NOT_CARRIED[name] if class_type == "KreaSampler" else set()
        assert {k: pasted[class_type][k] for k in small[class_type] if k not in skip} == \
            {k: v for k, v in small[class_type].items() if k not in skip}, class_type
    assert entry["copiedAfterPaste"] == entry["copiedSmall"]
    assert entry["pasteMessage"].startswith("Pasted fal request: Set from the fal request: prompt,")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_without_clipboard_copy_shows_the_request_in_a_dialog(name, browser):
    entry = browser["report"]["workflows"][name]
    assert entry["copiedViaDialog"] == entry["copiedSmall"]
    assert "clipboard is not available" in entry["copyFallbackMessage"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_paste_names_the_fields_it_cannot_map(name, browser):
    entry = browser["report"]["workflows"][name]
    message = entry["unmappedMessage"]
    assert "Not mapped: image_url" in message and "sync_mode" in message
    assert "Set from the fal request: prompt, guidance_scale." in message  # the other fields were set
    assert entry["unmappedValues"]["KreaTextEncode"]["prompt"] == "a red fox in the snow"
    assert entry["unmappedValues"]["KreaSampler"]["guidance_scale"] == 3.5
    assert any("image_url" in toast and "sync_mode" in toast for toast in entry["toasts"]), entry["toasts"]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_a_refused_prompt_names_each_problem_once(name, browser):
    text = browser["report"]["workflows"][name]["refusal"]
    assert text.count("width must be a multiple of 16 between 16 and 14142, got 1000") == 1, text
    assert "KreaSampler" in text


def test_the_extension_raised_no_errors_or_warnings(browser):
    report = browser["report"]
    assert report["extensionErrors"] == [], report["extensionErrors"]
    assert report["extensionWarnings"] == [], report["extensionWarnings"]  # deprecations name the extension
    assert report["menuEntries"] == {"Copy as fal request": 1, "Paste fal request": 1}
    assert report["frontendVersion"]
