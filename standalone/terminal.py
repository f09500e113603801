"""Progress for the command line -> bars on stderr, each redrawn in place on one line.

Whatever else goes to the terminal while a bar is unfinished (an error message, a log record, the next node's
name) first ends the bar's line, so it never lands behind the bar: `line()` for the command's own messages,
`LogHandler` for logging. One `TERMINAL` serves the whole command (local runs and `run --server`).
"""
from __future__ import annotations

import logging
import sys
import time

import torch

BAR_WIDTH = 30


class Terminal:
    """stderr, knowing whether a bar is on screen without its newline."""

    def __init__(self) -> None:
        self.bar_open = False

    def bar(self, label: str, done: int, total: int, note: str = "") -> None:
        """Draw `label [####....] done/total note` over the current bar; a full bar ends its line."""
        total = max(1, total)
        filled = int(BAR_WIDTH * min(done, total) / total)
        sys.stderr.write(f"\r{label}[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total}{note}")
        self.bar_open = done < total
        if not self.bar_open:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def end_line(self) -> None:
        """End an unfinished bar's line (nothing when none is open)."""
        if self.bar_open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.bar_open = False

    def line(self, text: str) -> None:
        """`text` on a line of its own."""
        self.end_line()
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


TERMINAL = Terminal()


class LogHandler(logging.StreamHandler):
    """Log records on stderr, each starting on a line of its own."""

    def __init__(self, terminal: Terminal = TERMINAL) -> None:
        super().__init__()
        self.terminal = terminal

    def emit(self, record: logging.LogRecord) -> None:
        self.terminal.end_line()
        self.stream = sys.stderr  # the current one (tests capture it)
        super().emit(record)


class StepBar:
    """The sampler's step callback (step, total, x0) as a bar with the time per step."""

    def __init__(self, terminal: Terminal = TERMINAL) -> None:
        self.terminal = terminal
        self.first = time.perf_counter()

    def __call__(self, step: int, total: int, x0: torch.Tensor) -> None:
        now = time.perf_counter()
        if step == 1:
            self.first = now
        rate = f" ({(now - self.first) / (step - 1):.2f} s/step)" if step > 1 else ""
        self.terminal.bar("  sampling ", step, total, rate)
