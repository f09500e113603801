"""How `main` ends a command: the exit code and the one `error: ...` line of each kind of ending (Ctrl-C 130, SIGTERM
143, bad input 2, a failed run 1, --debug's traceback), which function each command line goes to, the torchrun
refusal, and the log lines -v lets through.

The commands themselves are replaced by stand-ins that end the way a real run can: what is pinned here is main's
part, the same for every command (the runs themselves are tested in test_cli_run.py and the server tests)."""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import pytest

from comfyui_krea.nodes.host import Interrupted
from comfyui_krea.standalone import cli
from comfyui_krea.standalone.cli import Terminated, main
from comfyui_krea.standalone.runner import WorkflowError
from comfyui_krea.standalone.terminal import TERMINAL

ROOT = Path(__file__).resolve().parent.parent
TEXT_TO_IMAGE = ROOT / "workflows" / "api" / "krea_text_to_image.json"
RUN = ["run", str(TEXT_TO_IMAGE)]


@pytest.fixture(autouse=True)
def no_open_bar(monkeypatch):
    """The shared terminal as a fresh command finds it: no bar left open by another test."""
    monkeypatch.setattr(TERMINAL, "bar_open", False)


def run_ending_with(monkeypatch, error: BaseException) -> list:
    """Makes `run` raise `error`; returns the list the stand-in appends its (args, stop) to."""
    calls = []

    def run_command(args, stop=None):
        calls.append((args, stop))
        raise error

    monkeypatch.setattr(cli, "run_command", run_command)
    return calls


@pytest.mark.parametrize("error,code,line", [
    (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C); the run stopped and nothing more was written.\n"),
    (Terminated(), 143, "error: terminated (SIGTERM); the run stopped and nothing more was written.\n"),
    (Interrupted("the run was cancelled"), 143,
     "error: terminated (SIGTERM); the run stopped and nothing more was written.\n"),
    (WorkflowError("the workflow cannot run:\n  node 3: no such input"), 2,
     "error: the workflow cannot run:\n  node 3: no such input\n"),
    (FileExistsError("output/krea_00001_.png exists"), 2, "error: output/krea_00001_.png exists\n"),
    (ValueError("seed must be an integer"), 2, "error: seed must be an integer\n"),
    (RuntimeError("CUDA error: out of memory"), 1,
     "error: the run failed: RuntimeError: CUDA error: out of memory (run again with --debug for the traceback)\n"),
], ids=["ctrl-c", "sigterm", "interrupted", "workflow-error", "file-exists", "value-error", "failure"])
def test_each_ending_has_its_exit_code_and_one_error_line(monkeypatch, capsys, error, code, line):
    run_ending_with(monkeypatch, error)
    assert main(RUN) == code
    assert capsys.readouterr().err == line  # the whole of stderr: no traceback without --debug


def test_debug_prints_the_traceback_before_the_error_line(monkeypatch, capsys):
    run_ending_with(monkeypatch, RuntimeError("CUDA error: out of memory"))
    assert main([*RUN, "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    # The hint to use --debug is left out once it is given.
    assert err.endswith("RuntimeError: CUDA error: out of memory\n"
                        "error: the run failed: RuntimeError: CUDA error: out of memory\n")


def test_debug_also_traces_bad_input(monkeypatch, capsys):
    run_ending_with(monkeypatch, WorkflowError("no such file"))
    assert main([*RUN, "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n") and err.endswith("\nerror: no such file\n")


def test_the_error_line_starts_on_a_line_of_its_own_after_a_progress_bar(monkeypatch, capsys):
    def run_command(args, stop=None):
        TERMINAL.bar("  sampling ", 1, 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", run_command)
    assert main(RUN) == 130
    assert capsys.readouterr().err == ("\r  sampling [###############...............] 1/2\n"
                                       "error: interrupted (Ctrl-C); the run stopped and nothing more was written.\n")


def test_a_sigterm_whose_raise_is_swallowed_still_ends_the_run_with_143(monkeypatch, capsys):
    """SIGTERM sets the event main hands the run (the host's interrupt event) besides raising: code that swallows
    the raise (a library's bare `except:`) cannot keep the run going past its next check."""
    seen = []

    def run_command(args, stop=None):
        seen.append(args.command)
        try:
            signal.raise_signal(signal.SIGTERM)  # the handler raises Terminated here ...
        except BaseException:  # noqa: B036 ... and library code swallows it
            pass
        if stop is not None and stop.is_set():  # the host's next interrupt check
            raise Interrupted("the run was cancelled")
        return 0

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "run_command", run_command)
    assert main(RUN) == 143
    assert seen == ["run"]
    assert capsys.readouterr().err == "error: terminated (SIGTERM); the run stopped and nothing more was written.\n"
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the command


def test_without_argv_the_command_line_comes_from_sys_argv(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "run_command", lambda args, stop=None: seen.append(args.workflow) or 0)
    monkeypatch.setattr(sys, "argv", ["python -m comfyui_krea", *RUN])
    assert main() == 0
    assert seen == [TEXT_TO_IMAGE]


@pytest.mark.parametrize("argv,called", [
    (RUN, "run_command"),
    ([*RUN, "--server", "http://127.0.0.1:8188"], "run_remote_command"),
    (["serve", "--port", "9"], "serve_command"),
    (["make-cert", "certs"], "make_cert_command"),
], ids=["run", "run-server", "serve", "make-cert"])
def test_each_command_line_goes_to_its_command(monkeypatch, argv, called):
    seen = []
    for name in ("run_command", "run_remote_command", "serve_command", "make_cert_command"):
        monkeypatch.setattr(cli, name, lambda args, stop=None, name=name: seen.append((name, args.command)) or 7)
    assert main(argv) == 7  # the command's own exit code
    assert seen == [(called, argv[0])]


def test_a_command_without_debug_prints_no_traceback(monkeypatch, capsys):
    # make-cert has no --debug option: its errors are the error line alone.
    def make_cert_command(args):
        raise FileExistsError(f"{args.folder / 'ca.pem'} exists; make-cert never writes over a file")

    monkeypatch.setattr(cli, "make_cert_command", make_cert_command)
    assert main(["make-cert", "certs"]) == 2
    assert capsys.readouterr().err == "error: certs/ca.pem exists; make-cert never writes over a file\n"


def test_a_failure_of_a_command_without_debug_is_one_error_line_too(monkeypatch, capsys):
    def make_cert_command(args):
        raise RuntimeError("no entropy")

    monkeypatch.setattr(cli, "make_cert_command", make_cert_command)
    assert main(["make-cert", "certs"]) == 1
    # no hint to run again with --debug: make-cert has no such option
    assert capsys.readouterr().err == "error: the run failed: RuntimeError: no entropy\n"


def test_under_torchrun_only_a_local_run_is_accepted(monkeypatch, capsys):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    seen = []
    monkeypatch.setattr(cli, "serve_command", lambda args: seen.append(args) or 0)
    assert main(["serve"]) == 2
    assert seen == []
    assert capsys.readouterr().err == (
        "error: under torchrun only `run` of a workflow in this process works (each process would start its own "
        "`serve`, or queue its own copy of the workflow on the --server); start this command without torchrun\n")


# ----------------------------------------------------------------------------------------------- -v and logs

def logging_run(monkeypatch) -> None:
    """A run that opens a progress bar, then logs one INFO and one WARNING record; the root logger as a fresh
    process has it (no handler: pytest's own capture handler is taken off for the test; put back after it)."""
    def run_command(args, stop=None):
        TERMINAL.bar("  sampling ", 1, 2)
        log = logging.getLogger("comfyui_krea.standalone.runner")
        log.info("running node 3 (KreaSampler)")
        log.warning("the safety checker flagged 1 image")
        return 0

    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(cli, "run_command", run_command)


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_log_records_print_as_level_name_message_and_v_adds_the_informational_ones(monkeypatch, capsys, verbose):
    root = logging.getLogger()
    level = root.level
    logging_run(monkeypatch)
    try:
        assert main([*RUN, "-v"] if verbose else RUN) == 0
    finally:
        root.setLevel(level)
    # The record ends the bar's line first; only -v lets INFO through.
    info = "INFO comfyui_krea.standalone.runner: running node 3 (KreaSampler)\n" if verbose else ""
    assert capsys.readouterr().err == ("\r  sampling [###############...............] 1/2\n" + info
                                       + "WARNING comfyui_krea.standalone.runner: the safety checker flagged 1 image\n")
