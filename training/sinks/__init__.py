"""The run log: every record a run emits goes through one :class:`RunLog` to its sinks.

    log = open_runlog(cfg, run_dir, console=print)   # or RunLog([sink, ...])
    log.line('resuming ...')             # a message for people: the console only
    log.step(step, {'lr/weights': 0.4})  # after each optimizer step, only if a sink takes steps
    log.epoch(step, record)              # one per epoch: metrics.jsonl, the console line, ...
    log.summary(step, summary)           # the end: summary.json, the last lines, ...
    log.close()

A sink is a class with any of :class:`Sink`'s methods (the others stay no-ops); ``step`` is the
optimizer steps taken, the x-axis every sink shares. The console and ``metrics.jsonl`` are
always on; the others are switched on by a key of the config's ``output`` section and listed in
:data:`SINKS` as 'module:Class', imported only when on: a sink that is off costs nothing, not
even its import (``tensorboard`` takes ~1-6 s to import). A W&B or MLflow sink would be one more
file beside ``tensorboard.py`` (``wandb.log(record, step=step)`` in ``epoch``, ``wandb.finish()``
in ``close``), one :data:`SINKS` line and its ``output`` key.
"""
from __future__ import annotations

import importlib

SINKS = {  # output.<key> (a bool) -> the sink, built with (run folder path, resumed at step)
    'tensorboard': 'training.sinks.tensorboard:TensorBoardSink',
}


class Sink:
    def line(self, text: str) -> None: ...
    def step(self, step: int, scalars: dict) -> None: ...
    def epoch(self, step: int, record: dict) -> None: ...
    def summary(self, step: int, summary: dict) -> None: ...
    def close(self) -> None: ...


def _overrides(sink, method: str) -> bool:
    """Does ``sink`` take this kind of record? (A sink need not subclass :class:`Sink`.)"""
    own = getattr(type(sink), method, None)
    return own is not None and own is not getattr(Sink, method)


class RunLog:
    """Fans each record out to the sinks that take it (in order: the JSONL file before the console
    line, so a printed epoch is on disk)."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)
        self._takes = {m: [s for s in self.sinks if _overrides(s, m)]
                       for m in ('line', 'step', 'epoch', 'summary', 'close')}
        self.wants_steps = bool(self._takes['step'])  # the trainer builds step records only then

    def line(self, text: str) -> None:
        for s in self._takes['line']:
            s.line(text)

    def step(self, step: int, scalars: dict) -> None:
        for s in self._takes['step']:
            s.step(step, scalars)

    def epoch(self, step: int, record: dict) -> None:
        for s in self._takes['epoch']:
            s.epoch(step, record)

    def summary(self, step: int, summary: dict) -> None:
        for s in self._takes['summary']:
            s.summary(step, summary)

    def close(self) -> None:
        for s in self._takes['close']:
            s.close()


def open_runlog(cfg, run_dir, *, console, extra=(), is_main: bool = True, resumed_at: int | None = None) -> RunLog:
    """Rank 0's run log: ``metrics.jsonl`` and the console (``console``: print), the sinks of
    :data:`SINKS` whose ``output.<key>`` is on (imported here and only here), then ``extra``;
    the other ranks' logs nothing. ``run_dir``: the :class:`~training.state.RunFolder`."""
    if not is_main:
        return RunLog([])
    from .console import ConsoleSink
    from .jsonl import JsonlSink
    sinks = [JsonlSink(run_dir), ConsoleSink(console, epochs=cfg.training.epochs)]
    for key, where in SINKS.items():
        if cfg.output[key]:
            module, cls = where.split(':')
            sinks.append(getattr(importlib.import_module(module), cls)(run_dir.path, resumed_at=resumed_at))
    return RunLog([*sinks, *extra])
