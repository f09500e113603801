"""`torchrun --nproc-per-node N -m comfyui_krea run ...` (standalone/sequence_parallel_run.py): two real processes on
the gloo backend make the image one process makes (png, within one level of rounding), only rank 0 writes it and
prints, and rank 0 prints every rank's memory figures; rank counts that do not divide the heads and commands that
cannot run as several processes are refused before anything loads."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_krea.nodes.host import forget_loaded, host
from comfyui_krea.standalone.cli import main
from comfyui_krea.standalone.demo import write_demo_models
from comfyui_krea.standalone.runner import WorkflowError
from comfyui_krea.standalone.sequence_parallel_run import Processes

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
# 80x48: 15 image tokens, which 2 ranks do not divide.
SMALL = ["--width", "80", "--height", "48", "--steps", "4", "--acceleration", "high", "--format", "png",
         "--no-safety-checker",
         "--prompt", "a red fox", "--seed", "7"]


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    models, tokenizers = write_demo_models(tmp_path_factory.mktemp("sp_demo"))
    yield models, tokenizers
    forget_loaded()


@pytest.fixture
def host_settings():
    saved = host.settings()
    yield
    host.restore(saved)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).astype(int)


def test_torchrun_two_processes_make_the_image_of_one(demo_models, host_settings, tmp_path, capsys):
    models, tokenizers = demo_models
    options = ["--models", str(models), "--tokenizers", str(tokenizers), *SMALL]
    assert main(["run", str(TEXT_TO_IMAGE), "--output", str(tmp_path / "one"), *options]) == 0
    (expected,) = (tmp_path / "one").rglob("*.png")
    capsys.readouterr()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "comfyui_krea", "run", str(TEXT_TO_IMAGE), "--output", str(tmp_path / "two"),
                           *options], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = sorted((tmp_path / "two").rglob("*"))
    assert [p for p in written if p.is_file()] == [tmp_path / "two" / "krea" / "krea_00001_.png"]  # rank 0 only
    saved = [line for line in done.stdout.splitlines() if line.startswith("saved ")]
    assert saved == [f"saved {tmp_path / 'two' / 'krea' / 'krea_00001_.png'}"]
    assert "of 4 steps computed fully" in done.stdout
    assert "2 processes make each image (1 image of 80x48)" in done.stderr
    assert "rank 0, this machine's RAM: needs about" in done.stderr and "rank 1, " in done.stderr
    assert np.abs(pixels(written[-1]) - pixels(expected)).max() <= 1


def test_a_rank_count_that_does_not_divide_the_heads_is_refused_before_loading(demo_models, host_settings):
    models, _ = demo_models
    host.restore(dataclasses.replace(host.settings(), models_dir=models))
    prompt = {"1": {"class_type": "KreaModelLoader", "inputs": {"model_name": "flux1-krea-dev.safetensors"}}}
    with pytest.raises(WorkflowError, match=r"4 attention heads .* on 1, 2, 4 processes \(GPUs\), not 3"):
        Processes(rank=0, size=3).preflight(prompt, host.torch_device(), check_memory=True)


def test_serve_and_server_runs_are_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["run", str(TEXT_TO_IMAGE), "--server", "http://127.0.0.1:1"]) == 2
    assert "under torchrun only `run` of a workflow in this process works" in capsys.readouterr().err
