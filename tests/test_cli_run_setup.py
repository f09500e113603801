"""What `run` sets up before its first node runs: where models, tokenizers and images go (ComfyUI's folders when
the pack sits in its custom_nodes, else ./models and ./output), --demo's temporary folder and small settings, a node
saved without inputs, the host's progress bar and stop event, the memory check and --no-memory-check, and a stop
that comes before the first node.

Most tests stop the run where it checks the prompt (`check`), with what it had set up by then: the prompt with the
options written in and the host's settings, the folders and callbacks every node uses."""
from __future__ import annotations

import copy
import json
import logging
import tempfile
import threading
from pathlib import Path

import pytest
from PIL import Image

from comfyui_krea.nodes.host import Interrupted, standalone_host
from comfyui_krea.nodes.host.standalone_host import StandaloneSettings
from comfyui_krea.standalone import cli, sequence_parallel_run
from comfyui_krea.standalone.cli import comfyui_root, main, parse_args, run_command
from comfyui_krea.standalone.demo import write_demo_models
from comfyui_krea.standalone.terminal import StepBar

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
IMAGE_TO_IMAGE = ROOT / "workflows" / "api" / "krea_image_to_image.json"
# What the host holds before the run: none of these is what a run sets, so a setting the run leaves alone shows.
BEFORE = StandaloneSettings(models_dir=Path("/before/models"), output_dir=Path("/before/output"),
                            tokenizer_dir=Path("/before/tokenizers"), comfyui_dir=Path("/before/ComfyUI"))


class CheckReached(Exception):
    """Raised where the run checks its prompt: what was set up by then is in the test's hands."""


@pytest.fixture
def setup(host_state, tmp_path, monkeypatch):
    """Runs `run_command` from an empty working folder up to its check of the prompt; returns what it had set up:
    {"prompt": the prompt with the options written in, "host": the host's settings, "temp": the names in the temporary
    folder (a folder of the test's own)}."""
    host_state.restore(BEFORE)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))

    def run_until_check(*options: str, workflow: Path = TEXT_TO_IMAGE, stop: threading.Event | None = None) -> dict:
        seen = {}

        def check(prompt, classes):
            seen.update(prompt=copy.deepcopy(prompt), host=standalone_host().settings(),
                        temp=sorted(path.name for path in (tmp_path / "temp").iterdir()))
            raise CheckReached

        monkeypatch.setattr(cli, "check", check)
        with pytest.raises(CheckReached):
            run_command(parse_args(["run", str(workflow), *options]), stop)
        return seen

    return run_until_check


def test_without_folder_options_a_run_uses_models_and_output_of_the_working_folder(setup):
    host = setup()["host"]
    assert (host.models_dir, host.output_dir) == (Path("models"), Path("output"))


def test_folder_options_reach_the_host(setup, tmp_path):
    host = setup("--models", str(tmp_path / "m"), "--output", str(tmp_path / "o"), "--tokenizers",
                 str(tmp_path / "t"))["host"]
    assert (host.models_dir, host.output_dir, host.tokenizer_dir) == (tmp_path / "m", tmp_path / "o", tmp_path / "t")


def test_inside_comfyuis_custom_nodes_its_models_and_output_folders_are_the_defaults(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "comfyui_root", lambda: tmp_path / "ComfyUI")
    host = setup()["host"]
    assert (host.models_dir, host.output_dir, host.comfyui_dir) == (
        tmp_path / "ComfyUI" / "models", tmp_path / "ComfyUI" / "output", tmp_path / "ComfyUI")


def test_the_host_gets_a_step_bar_and_the_stop_event_of_the_run(setup):
    stop = threading.Event()
    host = setup(stop=stop)["host"]
    assert isinstance(host.progress, StepBar) and host.interrupt is stop


@pytest.mark.parametrize("where,models_folder,is_comfyui", [
    ("ComfyUI/custom_nodes/comfyui_krea", "ComfyUI/models", True),
    ("ComfyUI/custom_nodes/comfyui_krea", None, False),  # a custom_nodes folder, but no ComfyUI models beside it
    ("work/comfyui_krea", "models", False),  # a models folder two levels up, but not in custom_nodes
], ids=["in-comfyui", "no-models-folder", "not-in-custom-nodes"])
def test_comfyui_is_recognised_by_custom_nodes_and_its_models_folder(tmp_path, monkeypatch, where, models_folder,
                                                                     is_comfyui):
    (tmp_path / where).mkdir(parents=True)
    if models_folder:
        (tmp_path / models_folder).mkdir(parents=True)
    monkeypatch.setattr(cli, "PACK_DIR", tmp_path / where)
    assert comfyui_root() == (tmp_path / "ComfyUI" if is_comfyui else None)


# ------------------------------------------------------------------------------------------------------ --demo

def test_demo_builds_its_models_in_a_temporary_folder_removed_after_the_run(setup, tmp_path, capsys):
    seen = setup("--demo")
    host = seen["host"]
    scratch = host.models_dir.parent
    assert host.models_dir == scratch / "models" and host.tokenizer_dir == scratch / "tokenizers"
    assert scratch.parent == tmp_path / "temp" and scratch.name.startswith("krea-demo-")
    assert seen["temp"] == [scratch.name]  # the one temporary folder of the run
    assert not scratch.exists()  # removed, although the run ended with an error
    assert capsys.readouterr().err == ("--demo: building small RANDOM-WEIGHT models; the image will be noise. It "
                                       "only proves that the install, the nodes and the workflow run.\n")


def test_without_demo_no_temporary_folder_is_made(setup, tmp_path):
    assert setup("--models", str(tmp_path / "m"))["temp"] == []  # (looked at while the run was under way)


@pytest.mark.parametrize("options,workflow,expected", [
    ((), TEXT_TO_IMAGE, {"image_size": "custom", "width": 256, "height": 256, "num_inference_steps": 4}),
    (("--steps", "2", "--width", "128"), TEXT_TO_IMAGE,
     {"image_size": "custom", "width": 128, "height": 256, "num_inference_steps": 2}),
    (("--image-size", "square"), TEXT_TO_IMAGE,
     {"image_size": "square", "width": 1024, "height": 768, "num_inference_steps": 4}),
    ((), IMAGE_TO_IMAGE, {"image_size": "landscape_4_3", "width": 1024, "height": 768, "num_inference_steps": 4}),
], ids=["text-to-image", "options-win", "image-size-given", "image-to-image"])
def test_demo_makes_small_images_in_few_steps_unless_told_or_sized_otherwise(setup, options, workflow, expected):
    # 256x256 in 4 steps; the size only where nothing else sizes the image (a preset, the input image).
    sampler = setup("--demo", *options, workflow=workflow)["prompt"]["3"]["inputs"]
    assert {name: sampler[name] for name in expected} == expected


def test_a_node_saved_without_inputs_takes_them_from_the_options(setup, tmp_path):
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    del prompt["2"]["inputs"]  # the text encoder's
    (tmp_path / "no_inputs.json").write_text(json.dumps(prompt))
    seen = setup("--prompt", "a fox", "--set", '2.text_encoder=["1", 1]', workflow=tmp_path / "no_inputs.json")
    assert seen["prompt"]["2"] == {**prompt["2"], "inputs": {"prompt": "a fox", "text_encoder": ["1", 1]}}


# -------------------------------------------------------------------------------- memory check, early stop

@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("run_setup"))


def small_run(demo_models, tmp_path, *options: str) -> list[str]:
    models, tokenizers = demo_models
    return ["run", str(TEXT_TO_IMAGE), "--models", str(models), "--tokenizers", str(tokenizers), "--output",
            str(tmp_path / "out"), "--width", "64", "--height", "48", "--steps", "1", "--no-safety-checker", *options]


def test_a_run_that_does_not_fit_in_memory_is_refused_unless_told_to_try(demo_models, host_state, tmp_path,
                                                                          monkeypatch, capsys):
    asked = []

    def memory_problem(prompt, device):
        asked.append(device.type)
        return f"a {prompt['3']['inputs']['width']}x{prompt['3']['inputs']['height']} image does not fit on {device}"

    monkeypatch.setattr(sequence_parallel_run, "memory_problem", memory_problem)
    assert main(small_run(demo_models, tmp_path)) == 2
    assert capsys.readouterr().err == "error: a 64x48 image does not fit on cpu\n"
    assert asked == ["cpu"] and not (tmp_path / "out").exists()
    assert main(small_run(demo_models, tmp_path, "--no-memory-check")) == 0
    assert asked == ["cpu"]  # not asked again
    assert len(list((tmp_path / "out").rglob("*.png"))) == 1


def test_a_stop_before_the_run_ends_it_before_the_first_node(demo_models, host_state, tmp_path, caplog):
    """The stop event (set by SIGTERM) is checked as each node starts, not only inside the nodes that check it
    themselves: no node runs, not even the model loader, which has no check of its own."""
    stop = threading.Event()
    stop.set()
    with caplog.at_level(logging.INFO, logger="comfyui_krea.standalone.runner"), pytest.raises(Interrupted):
        run_command(parse_args(small_run(demo_models, tmp_path)), stop)
    assert [r.getMessage() for r in caplog.records if r.name == "comfyui_krea.standalone.runner"] == [
        "running node 1 (KreaModelLoader)"]  # told as it was about to start; then stopped
    assert not (tmp_path / "out").exists()


def test_a_ui_workflows_nodes_are_titled_with_their_display_names(setup):
    # As ComfyUI's frontend exports a node that has no title of its own: the name the node menu shows.
    prompt = setup(workflow=ROOT / "workflows" / "krea_text_to_image.json")["prompt"]
    assert {node_id: node["_meta"]["title"] for node_id, node in prompt.items()} == {
        "1": "Krea Model Loader", "2": "Krea Text Encode", "3": "Krea Sampler", "4": "Krea Decode",
        "5": "Krea Safety Check", "6": "Krea Save Image"}


# ---------------------------------------------------------------------------- refused before anything is set up

def test_a_workflow_with_something_that_is_not_a_node_is_refused_as_such(tmp_path, capsys):
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    prompt["9"] = [1, 2]
    (tmp_path / "bad.json").write_text(json.dumps(prompt))
    assert main(["run", str(tmp_path / "bad.json"), "--prompt", "a fox"]) == 2
    assert capsys.readouterr().err == ('error: the workflow cannot run:\n  node 9: not a node (an API-format node is '
                                       '{"class_type": ..., "inputs": {...}})\n')


def copy_workflow(folder: Path) -> Path:
    """folder/copy.json: LoadImage -> Krea Save Image, a workflow without a Krea Sampler."""
    path = folder / "copy.json"
    path.write_text(json.dumps({
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "KreaSaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy",
                                                        "output_format": "png", "quality": 95}}}))
    return path


def test_only_the_options_the_user_gave_are_refused_with_demo(tmp_path, capsys):
    # A workflow without a Krea Sampler: --demo's small size and step count must not be reported as unused options
    # the user gave (--prompt is the one given that the workflow has no place for).
    assert main(["run", str(copy_workflow(tmp_path)), "--demo", "--prompt", "a fox"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --prompt is not used by this workflow: it needs a Krea Text Encode node.\n"


def test_demo_runs_a_workflow_without_a_sampler(tmp_path, capsys, host_state):
    # The demo's small size and few steps are for a sampler; a workflow without one runs with them left out.
    Image.new("RGB", (24, 16), (200, 10, 10)).save(tmp_path / "red.png")
    out = tmp_path / "out"
    assert main(["run", str(copy_workflow(tmp_path)), "--demo", "--image", str(tmp_path / "red.png"),
                 "--output", str(out)]) == 0, capsys.readouterr().err
    with Image.open(out / "copy_00001_.png") as saved:
        assert saved.size == (24, 16) and saved.getpixel((0, 0)) == (200, 10, 10)
