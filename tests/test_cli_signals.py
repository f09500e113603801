"""SIGTERM during `run`: the run stops with exit 143, writes no image and removes the demo's temporary folder, also
when the raise of the signal handler lands in library code that swallows every exception.

The first test is timed by what the program prints (the first step's progress line), not by sleeping.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comfyui_krea.standalone.cli import main
from comfyui_krea.standalone.demo import write_demo_models

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    return write_demo_models(tmp_path_factory.mktemp("signals"))


def one_error_line(stderr: str) -> str:
    """The error paragraph; no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return stderr[stderr.index("error: "):]


def read_until(stream, marker: bytes, timeout_s: float) -> bytes:
    """What the process wrote to `stream` up to and including `marker` (the progress bar has no newline)."""
    seen, deadline = b"", time.monotonic() + timeout_s
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break  # the process ended
            seen += chunk
    return seen


def test_sigterm_during_a_demo_leaves_no_temporary_folder(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": os.pathsep.join(sys.path)}
    # 50 steps at 512x512: the signal is sent at the first step's progress line, long before the last.
    process = subprocess.Popen([sys.executable, "-m", "comfyui_krea", "run", str(TEXT_TO_IMAGE), "--demo",
                                "--output", str(tmp_path / "out"), "--width", "512", "--height", "512",
                                "--steps", "50", "--no-safety-checker"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = read_until(process.stderr, b" 1/50", timeout_s=300)  # printed once sampling runs
    assert b" 1/50" in started, started.decode(errors="replace")
    assert list(scratch.glob("krea-demo-*"))  # the demo's models are there to be removed
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=300)
    stderr = (started + rest).decode(errors="replace")
    assert process.returncode == 143, stderr
    assert "error: terminated (SIGTERM)" in stderr and "Traceback" not in stderr and " 50/50" not in stderr
    # torch's own compile cache (torchinductor_<user>, made when torch first imports torch._dynamo) is torch's to keep
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.jp*g"))


def test_a_sigterm_whose_raise_library_code_swallows_still_stops_the_run(demo_models, tmp_path, monkeypatch,
                                                                        capsys, host_state):
    """The SIGTERM handler runs between any two bytecodes, and code that catches every exception (a bare `except:`
    in a library, a `__del__`) swallows what it raises; the run must stop anyway, at its next interrupt check."""
    from comfyui_krea.standalone import cli as cli_module

    models, tokenizers = demo_models
    steps: list[int] = []

    class SwallowingProgress(cli_module.TextProgress):
        def __call__(self, step: int, total: int, x0: torch.Tensor) -> None:
            steps.append(step)
            if step == 2:
                try:  # what `try: import gmpy2 ... except: ...` does to a signal arriving inside it
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(30)  # the handler raises here, at once
                except BaseException:  # noqa: B036 (the point of the test)
                    pass

    monkeypatch.setattr(cli_module, "TextProgress", SwallowingProgress)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["run", str(TEXT_TO_IMAGE), "--models", str(models), "--tokenizers", str(tokenizers),
                 "--output", str(tmp_path / "out"), "--width", "64", "--height", "64", "--steps", "6",
                 "--no-safety-checker"])
    assert code == 143 and steps == [1, 2]  # stopped before the third step's first block
    assert "error: terminated (SIGTERM)" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.jp*g"))
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
