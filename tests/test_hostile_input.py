"""Hostile and careless input on the command line and the nodes (issue 14), one test per class of failure:
path escape, late checks (each now refused before any loader runs), former tracebacks (now one error line and
exit code 2), silent ignores, seeds up to 2^64 - 1, sizes that cannot fit, temporary folders, interrupts.
Data loss (no file replaced, two processes saving to one folder) is shown in test_image_nodes.py.
"""
from __future__ import annotations

import builtins
import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest
import torch

from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.checkpoints.reader import SafetensorsFile
from comfyui_krea.model_loader.flux import FluxTransformer
from comfyui_krea.nodes.host import forget_loaded, host
from comfyui_krea.nodes.loader import KreaModelLoader
from comfyui_krea.nodes.safety import KreaSafetyCheck
from comfyui_krea.sampling.interrupt import interrupt_between_blocks
from comfyui_krea.standalone import preflight
from comfyui_krea.standalone.cli import main
from comfyui_krea.standalone.demo import write_demo_models
from conftest import TINY_FLUX

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
IMAGE_TO_IMAGE = ROOT / "workflows" / "api" / "krea_image_to_image.json"


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    models, tokenizers = write_demo_models(root)
    (models / "vae" / "garbage.safetensors").write_bytes(b"\x00" * 5000)
    (models / "vae" / "empty.safetensors").write_bytes(b"")
    (models / "safety_checker" / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 100)
    # A VAE where the safety classifier belongs: the right format, the wrong model.
    (models / "safety_checker" / "ae.safetensors").write_bytes((models / "vae" / "ae.safetensors").read_bytes())
    bad_offsets = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}).encode()
    (models / "vae" / "offsets.safetensors").write_bytes(struct.pack("<Q", len(bad_offsets)) + bad_offsets
                                                         + b"\x00" * 16)
    (root / "outside.safetensors").write_bytes(b"secret" * 100)
    yield models, tokenizers
    forget_loaded()


@pytest.fixture
def cli(tmp_path, monkeypatch, demo_models):
    """main() in an empty working folder with the demo models; `calls` records every model loader call."""
    saved = host.settings()
    host.restore(dataclasses.replace(saved, tokenizer_dir=None))
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []
    real_load = KreaModelLoader.load

    def recording_load(self, *args, **kwargs):
        calls.append("KreaModelLoader")
        return real_load(self, *args, **kwargs)

    monkeypatch.setattr(KreaModelLoader, "load", recording_load)
    models, tokenizers = demo_models

    def run(*options: str, workflow: Path = TEXT_TO_IMAGE) -> int:
        return main(["run", str(workflow), "--models", str(models), "--tokenizers", str(tokenizers),
                     "--output", str(tmp_path / "out"), "--width", "64", "--height", "48", "--steps", "1",
                     *options] if workflow == TEXT_TO_IMAGE else
                    ["run", str(workflow), "--models", str(models), "--tokenizers", str(tokenizers),
                     "--output", str(tmp_path / "out"), "--steps", "1", *options])

    run.calls = calls
    run.folder = tmp_path
    yield run
    host.restore(saved)


def one_error_line(stderr: str) -> str:
    """The error paragraph; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return stderr[stderr.index("error: "):]


# ------------------------------------------------------------------------------------------------ path escape

@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE",
                                  "..\\outside.safetensors", "C:/outside.safetensors"])
def test_model_names_leaving_the_folder_are_refused_and_the_file_is_never_touched(demo_models, host_state,
                                                                                 monkeypatch, name):
    models, _ = demo_models
    planted = models.parent / "outside.safetensors"
    name = str(planted) if name == "ABSOLUTE" else name
    host_state.configure(models_dir=models)
    touched: list[str] = []
    for module, attribute in ((os, "stat"), (os, "lstat"), (os, "open"), (builtins, "open")):
        real = getattr(module, attribute)

        def spy(path, *args, _real=real, **kwargs):
            touched.append(os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path))
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(module, attribute, spy)
    with pytest.raises(ModelFileError, match="leaves the model folder") as err:
        host.model_path("diffusion_models", name)
    problem = KreaModelLoader.VALIDATE_INPUTS(model_name=name, clip_name="clip_l.safetensors",
                                              t5_name="t5xxl_fp16.safetensors", vae_name="ae.safetensors")
    safety = KreaSafetyCheck.VALIDATE_INPUTS(checker_name=name, enable_safety_checker=False)
    monkeypatch.undo()
    assert not any("outside" in path for path in touched), touched
    assert "leaves the model folder" in problem and "leaves the model folder" in safety
    # The message is the same whether or not the outside file exists, and tells nothing about it.
    missing = name.replace("outside", "nothing-here")
    with pytest.raises(ModelFileError) as other:
        host.model_path("diffusion_models", missing)
    assert str(other.value) == str(err.value).replace("outside", "nothing-here")
    assert "600" not in str(err.value) and "bytes" not in str(err.value)


def test_a_workflow_cannot_make_the_command_line_open_a_file_outside(cli, capsys):
    for option in ("1.model_name=../outside.safetensors", "1.vae_name=../../outside.safetensors",
                   "5.checker_name=../outside.safetensors"):
        assert cli("--set", option) == 2
        assert "leaves the model folder" in one_error_line(capsys.readouterr().err)
    assert cli.calls == []


def test_names_inside_the_folder_still_resolve(demo_models, host_state):
    models, _ = demo_models
    host_state.configure(models_dir=models)
    assert host.model_path("vae", "ae.safetensors") == models.absolute() / "vae" / "ae.safetensors"
    assert host.model_path("vae", "./ae.safetensors").name == "ae.safetensors"


# ---------------------------------------------------------------------- late checks: refused before any loader

@pytest.mark.parametrize("options,workflow,message", [
    (["--output", "FILE"], TEXT_TO_IMAGE, "images cannot be written to"),
    (["--set", "6.filename_prefix=../../escape"], TEXT_TO_IMAGE, "filename_prefix '../../escape' cannot be used"),
    (["--set", "5.checker_name=missing.safetensors"], TEXT_TO_IMAGE, "no NSFW classifier was found"),
    (["--set", "5.checker_name=pickle.safetensors"], TEXT_TO_IMAGE, "is not a safetensors file"),
    (["--set", "5.checker_name=ae.safetensors"], TEXT_TO_IMAGE, "checker_name: 'ae.safetensors' is a VAE"),
    (["--set", "1.vae_name=garbage.safetensors"], TEXT_TO_IMAGE, "vae_name: "),
    (["--set", "1.vae_name=empty.safetensors"], TEXT_TO_IMAGE, "is not a safetensors file (it is 0 bytes long)"),
    (["--set", "1.vae_name=t5xxl_fp16.safetensors"], TEXT_TO_IMAGE, "Model file 't5xxl_fp16.safetensors' not found"),
    (["--set", "1.clip_name=t5xxl_fp16.safetensors"], TEXT_TO_IMAGE, "is a T5 text encoder, not a CLIP"),
    (["--image", "MISSING"], IMAGE_TO_IMAGE, "not found (give the input image with --image)"),
    (["--image", "TEXT"], IMAGE_TO_IMAGE, "is not an image file"),
    (["--image", "TRUNCATED"], IMAGE_TO_IMAGE, "damaged or truncated"),
    (["--guidance", "nan"], TEXT_TO_IMAGE, "guidance_scale: nan is not a finite number"),
    (["--set", "3.guidance_scale=NaN"], TEXT_TO_IMAGE, "guidance_scale: nan is not a finite number"),
    (["--set", "5.threshold=NaN"], TEXT_TO_IMAGE, "threshold: nan is not a finite number"),
    (["--image", "IMAGE", "--strength", "nan"], IMAGE_TO_IMAGE, "strength: nan is not a finite number"),
    (["--set", "3.width=256.0"], TEXT_TO_IMAGE, "width must be a whole number"),
    (["--set", "3.num_images=2.0"], TEXT_TO_IMAGE, "num_images: 2.0 is not an integer"),
    (["--prompt", "x" * 200_000], TEXT_TO_IMAGE, "prompt is 200000 characters long"),
    (["--prompt", "a \ud800 cat"], TEXT_TO_IMAGE, "not valid Unicode"),
], ids=["unwritable-output", "prefix-escape", "missing-checker", "pickle-checker", "wrong-kind-checker",
        "garbage-vae", "empty-vae", "vae-in-wrong-folder", "clip-is-t5", "missing-image", "not-an-image",
        "truncated-image", "nan-guidance", "nan-guidance-set", "nan-threshold", "nan-strength", "float-width",
        "float-int", "huge-prompt", "lone-surrogate"])
def test_each_late_check_now_fails_before_any_loader_runs(cli, capsys, options, workflow, message):
    from PIL import Image

    folder = cli.folder
    files = {"FILE": folder / "a-file", "MISSING": folder / "nope.png", "TEXT": folder / "notes.png",
             "TRUNCATED": folder / "cut.png", "IMAGE": folder / "in.png"}
    files["FILE"].write_text("not a folder")
    files["TEXT"].write_text("hello")
    Image.new("RGB", (64, 48), "red").save(files["IMAGE"])
    files["TRUNCATED"].write_bytes(files["IMAGE"].read_bytes()[:-40])
    options = [str(files[o]) if o in files else o for o in options]
    assert cli(*options, workflow=workflow) == 2
    error = one_error_line(capsys.readouterr().err)
    assert message in error, error
    assert cli.calls == []  # no model loader ran
    assert not (folder / "out").exists() or not any((folder / "out").rglob("*.*"))


def test_a_run_that_does_not_fit_in_memory_is_refused_with_the_numbers(cli, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda device: (1024**2, "this machine's RAM"))
    assert cli() == 2
    error = one_error_line(capsys.readouterr().err)
    assert "this run needs about" in error and "1 image of 64x48" in error and "0.0 GiB free" in error
    assert "--no-memory-check" in error and cli.calls == []
    assert cli("--no-memory-check", "--no-safety-checker") == 0  # the option overrides it
    capsys.readouterr()


def test_the_memory_estimate_grows_with_size_and_batch(demo_models, host_state):
    host_state.configure(models_dir=demo_models[0])
    prompt = json.loads(TEXT_TO_IMAGE.read_text())
    small = preflight.estimate(prompt)
    prompt["3"]["inputs"].update(image_size="custom", width=14128, height=14128, num_images=4)
    big = preflight.estimate(prompt)
    assert small.weights == big.weights > 0
    assert big.activations > 500 * small.activations and big.total > 32 * 1024**3  # refused on most machines


# ---------------------------------------------------------------- former tracebacks: one error line, exit 2

def test_former_tracebacks_are_error_lines(cli, capsys, tmp_path):
    broken = tmp_path / "latin1.json"
    broken.write_bytes(TEXT_TO_IMAGE.read_bytes().replace(b"candid", "caf\xe9".encode("latin-1")))
    not_nodes = tmp_path / "list.json"
    not_nodes.write_text(json.dumps({"1": [1, 2], "2": {"class_type": "KreaSaveImage", "inputs": []}}))
    cases = [
        (["run", str(broken)], "is not UTF-8 text"),
        (["run", str(not_nodes)], "node 1: not a node"),
        (["run", str(tmp_path / "absent.json")], "cannot read the workflow"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in one_error_line(capsys.readouterr().err)
    assert cli("--set", '3.width="256"') == 2  # a quoted string for an INT
    assert "width must be a whole number" in one_error_line(capsys.readouterr().err)
    assert cli("--set", "1.vae_name=offsets.safetensors") == 2  # malformed offsets in a safetensors header
    assert "header entry of tensor 'w' is damaged" in one_error_line(capsys.readouterr().err)
    assert cli.calls == []


def test_malformed_safetensors_offsets_are_a_model_file_error(tmp_path):
    for entry in ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},  # too few bytes for the shape
                  {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
                  {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
                  {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
                  {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]},
                  {"dtype": "F32", "shape": [1], "data_offsets": "0-4"},
                  {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]},
                  [1, 2]):
        header = json.dumps({"w": entry}).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)
        with pytest.raises(ModelFileError, match="damaged"):
            SafetensorsFile(path)


def test_ctrl_c_and_failures_are_one_line_with_their_exit_codes(cli, capsys, monkeypatch):
    from comfyui_krea.nodes.sampler import KreaSampler

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(KreaSampler, "sample", interrupted)
    assert cli() == 130
    assert "error: interrupted (Ctrl-C)" in one_error_line(capsys.readouterr().err)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: something deep")

    monkeypatch.setattr(KreaSampler, "sample", broken)
    assert cli() == 1
    assert "--debug" in one_error_line(capsys.readouterr().err)
    assert cli("--debug") == 1
    assert "Traceback" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- silent ignores

@pytest.mark.parametrize("options,workflow,message", [
    (["--set", "3.nonsense=1"], TEXT_TO_IMAGE, "node 3 (KreaSampler) has no input 'nonsense'; its inputs are model"),
    (["--set", "5.num_images=2"], TEXT_TO_IMAGE, "node 5 (KreaSafetyCheck) has no input 'num_images'"),
    (["--image", "x.png"], TEXT_TO_IMAGE, "--image is not used by this workflow"),
    (["--strength", "0.5"], TEXT_TO_IMAGE, "--strength is not used by this workflow"),
    (["--width", "64"], IMAGE_TO_IMAGE, "--width is not used by this workflow"),
    (["--image-size", "square"], IMAGE_TO_IMAGE, "--image-size is not used by this workflow"),
], ids=["unknown-set-input", "help-example", "image-t2i", "strength-t2i", "width-i2i", "image-size-i2i"])
def test_unused_options_and_unknown_inputs_are_refused(cli, capsys, options, workflow, message):
    assert cli(*options, workflow=workflow) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert cli.calls == []


def test_models_with_demo_is_refused(capsys, tmp_path):
    assert main(["run", str(TEXT_TO_IMAGE), "--demo", "--models", str(tmp_path)]) == 2
    assert "--models is not used by this workflow: it needs no --demo" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------------------------------- seeds

def test_seeds_are_integers_up_to_2_to_the_64_minus_1(cli, capsys):
    assert cli("--seed", str(2**64 - 1), "--no-safety-checker", "--format", "png") == 0
    stdout = capsys.readouterr().out
    (path,) = [Path(line.removeprefix("saved ")) for line in stdout.splitlines() if line.startswith("saved ")]
    from PIL import Image

    with Image.open(path) as image:
        assert json.loads(image.text["prompt"])["3"]["inputs"]["seed"] == 2**64 - 1
    assert cli("--seed", str(2**64)) == 2
    assert "seed: 18446744073709551616 is bigger than the maximum" in one_error_line(capsys.readouterr().err)


# -------------------------------------------------------------------------------------- temporary folders

def test_no_temporary_folder_without_demo(cli, capsys, monkeypatch, tmp_path):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert cli("--no-safety-checker") == 0
    assert list(scratch.iterdir()) == []
    capsys.readouterr()


# --------------------------------------------------------------------------- interrupt between transformer blocks

def test_the_interrupt_check_runs_before_every_block_and_is_removed_after():
    torch.manual_seed(0)
    model = FluxTransformer(TINY_FLUX).eval()
    blocks = len(model.double_blocks) + len(model.single_blocks)
    batch, tokens = 1, 4
    args = (torch.randn(batch, tokens, TINY_FLUX.in_channels), torch.zeros(batch, tokens, 3),
            torch.randn(batch, 3, TINY_FLUX.context_in_dim), torch.zeros(batch, 3, 3), torch.tensor([0.5]),
            torch.randn(batch, TINY_FLUX.vec_in_dim), torch.tensor([3.5]) if TINY_FLUX.guidance_embed else None)
    with torch.no_grad():
        reference = model.forward_orig(*args)
    calls = []
    with interrupt_between_blocks(model, lambda: calls.append(1)), torch.no_grad():
        assert torch.equal(model.forward_orig(*args), reference)  # the math is unchanged
    assert len(calls) == blocks

    class Cancelled(Exception):
        pass

    def cancel_at_second_block():
        calls.append(1)
        if len(calls) == blocks + 2:
            raise Cancelled

    with pytest.raises(Cancelled), interrupt_between_blocks(model, cancel_at_second_block), torch.no_grad():
        model.forward_orig(*args)
    assert len(calls) == blocks + 2  # stopped inside the step, at its second block
    with torch.no_grad():
        model.forward_orig(*args)
    assert len(calls) == blocks + 2  # no hook is left behind
    assert all(not block._forward_pre_hooks for block in [*model.double_blocks, *model.single_blocks])
