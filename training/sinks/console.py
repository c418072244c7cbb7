"""The console sink: messages, one line per epoch, the run's last lines (``training/report.py``
words them)."""
from __future__ import annotations

from ..report import done_lines, epoch_line
from . import Sink


class ConsoleSink(Sink):
    def __init__(self, log=print, *, epochs: int):
        self.log, self.epochs = log, epochs

    def line(self, text: str) -> None:
        self.log(text)

    def epoch(self, step: int, record: dict) -> None:
        self.log(epoch_line(record, epochs=self.epochs))

    def summary(self, step: int, summary: dict) -> None:
        for line in done_lines(summary):
            self.log(line)
