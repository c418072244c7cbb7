"""The run folder's own record: ``metrics.jsonl`` (one JSON object per epoch, rewritten
atomically by :class:`~training.state.RunFolder`, which keeps a resumed run's earlier lines)
and ``summary.json``."""
from __future__ import annotations

from . import Sink


class JsonlSink(Sink):
    def __init__(self, run_dir):
        self.run_dir = run_dir  # training.state.RunFolder

    def epoch(self, step: int, record: dict) -> None:
        self.run_dir.add_record(record)

    def summary(self, step: int, summary: dict) -> None:
        from ..metrics import write_json
        write_json(self.run_dir.path / 'summary.json', summary)
