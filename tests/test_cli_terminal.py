"""The command line's terminal: progress bars redrawn on one line, and whatever else is written while a bar is
unfinished (an error, a log record, the next node) starting on a line of its own."""
from __future__ import annotations

import logging

import torch

from comfyui_krea.standalone.terminal import LogHandler, StepBar, Terminal


def test_a_message_during_an_unfinished_bar_starts_on_its_own_line(capsys):
    terminal = Terminal()
    terminal.bar("  ", 1, 2)
    terminal.line("error: interrupted (Ctrl-C)")
    assert capsys.readouterr().err == "\r  [###############...............] 1/2\nerror: interrupted (Ctrl-C)\n"


def test_a_finished_bar_ends_its_line_once(capsys):
    terminal = Terminal()
    terminal.bar("  ", 2, 2)
    terminal.line("  Krea Decode")
    terminal.end_line()
    assert capsys.readouterr().err == "\r  [##############################] 2/2\n  Krea Decode\n"


def test_a_log_record_never_lands_behind_a_bar(capsys):
    terminal = Terminal()
    logger = logging.getLogger("comfyui_krea.test_terminal")
    handler = LogHandler(terminal)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        StepBar(terminal)(1, 4, torch.zeros(1))
        logger.warning("a warning")
        StepBar(terminal)(4, 4, torch.zeros(1))
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "] 1/4\na warning\n" in err and "] 4/4" in err and err.endswith("s/step)\n"), err


def test_a_message_before_any_bar_comes_without_a_blank_line(capsys):
    terminal = Terminal()
    terminal.end_line()
    terminal.line("  Krea Model Loader")
    assert capsys.readouterr().err == "  Krea Model Loader\n"
