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


def test_a_bar_of_one_and_a_bar_of_nothing(capsys):
    terminal = Terminal()
    terminal.bar("  ", 1, 1)  # one step: full at once, its line ended
    terminal.bar("  ", 0, 0)  # nothing to do (total 0) is drawn as 0 of 1, empty and open
    terminal.end_line()
    assert capsys.readouterr().err == ("\r  [##############################] 1/1\n"
                                       "\r  [..............................] 0/1\n")


def test_an_ended_line_is_not_ended_twice(capsys):
    terminal = Terminal()
    terminal.bar("  ", 1, 3)
    terminal.end_line()
    terminal.end_line()
    terminal.line("  Krea Decode")
    assert capsys.readouterr().err == "\r  [##########....................] 1/3\n  Krea Decode\n"


def test_the_sampling_bar_shows_the_mean_time_per_step_since_the_first(monkeypatch, capsys):
    # A clock read once per call: the bar made at 0 s, steps 1, 2 and 3 reported at 10, 10.5 and 11.5 s.
    clock = iter([0.0, 10.0, 10.5, 11.5])
    monkeypatch.setattr("comfyui_krea.standalone.terminal.time.perf_counter", lambda: next(clock))
    bar = StepBar(Terminal())
    for step in (1, 2, 3):
        bar(step, 3, torch.zeros(1))
    assert capsys.readouterr().err == ("\r  sampling [##########....................] 1/3"
                                       "\r  sampling [####################..........] 2/3 (0.50 s/step)"
                                       "\r  sampling [##############################] 3/3 (0.75 s/step)\n")


def test_a_bar_first_told_of_a_later_step_times_it_from_its_making(monkeypatch, capsys):
    # (The pack's sampler always starts at step 1; a caller that starts later still gets a time, not a crash.)
    clock = iter([4.0, 6.0])
    monkeypatch.setattr("comfyui_krea.standalone.terminal.time.perf_counter", lambda: next(clock))
    StepBar(Terminal())(3, 4, torch.zeros(1))
    assert capsys.readouterr().err == "\r  sampling [######################........] 3/4 (1.00 s/step)"
