"""Where a run's wall-clock goes, from the moment the kernel started the process.

    budget = TimeBudget()                      # the clock started with the process, not here
    with budget.span('data_open'):
        data = build_data(...)
    budget.add('data_wait', stats.wait_s)      # sums over epochs
    budget.report()  # {'startup': 2.9, 'device_init': 0.0, ..., 'other': 0.1, 'total': 11.8}

The speed records of this field time only their training loop; we keep the honest clock (a user
waits from the moment they press enter) and split it into named spans, so that what the clock
measures can be made small. :data:`SPANS` names them in the order a run passes through them;
``startup`` is the interpreter and the imports (process start -> :class:`TimeBudget` created),
``other`` whatever no span claimed, so the spans always sum to the total.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

_IMPORTED_AT = time.perf_counter()  # the fallback clock start where /proc is missing (macOS)

SPANS = {  # name -> what it holds
    'startup': 'interpreter and imports (process start -> trainer set-up)',
    'device_init': 'device, precision, distributed init, seeds',
    'data_open': 'manifest and file checks, loaders built, test split onto the device',
    'loader_warmup': 'FFCV/numba JIT compilation (or worker start) before the first epoch',
    'model_build': 'model, optimizer, LR schedule, resume, run folder',
    'first_steps': 'the first training steps of this process (cuDNN autotuning, allocator)',
    'train_steps': 'training steps, summed over epochs (less first_steps and data_wait)',
    'data_wait': 'waiting for the next training batch, summed over epochs',
    'evaluation': 'test-set evaluation, summed over epochs',
    'checkpointing': 'checkpoint time on the critical path (snapshot; a wait for the previous write)',
    'logging': 'metrics.jsonl, log lines, progress checks',
    'end': 'summary, plot, waiting for the last checkpoint write',
    'other': 'what no span claimed',
}


def process_start() -> float:
    """The ``time.perf_counter()`` reading at which the kernel started this process: Linux's
    ``/proc/self/stat`` start time (clock ticks since boot, 10 ms resolution) against
    CLOCK_BOOTTIME; elsewhere the moment this module was first imported."""
    try:
        with open('/proc/self/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()  # after "pid (comm)": field 3 onwards
        start = int(fields[19]) / os.sysconf('SC_CLK_TCK')  # field 22: starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT
    return time.perf_counter() - age if 0 <= age < 7 * 86400 else _IMPORTED_AT


class TimeBudget:
    """Seconds per span (:data:`SPANS`) of this process's wall-clock."""

    def __init__(self, start: float | None = None):
        self.start = process_start() if start is None else start
        self.seconds = dict.fromkeys(SPANS, 0.0)
        self.seconds['startup'] = time.perf_counter() - self.start

    def elapsed(self) -> float:
        """Seconds since the process started."""
        return time.perf_counter() - self.start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds  # KeyError on a misspelt span: spans are a fixed set

    @contextmanager
    def span(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def report(self) -> dict[str, float]:
        """Every span in order, ``other`` = the rest, and ``total``: the process's wall-clock."""
        total = self.elapsed()
        out = {k: round(v, 4) for k, v in self.seconds.items() if k != 'other'}
        out['other'] = round(total - sum(v for k, v in self.seconds.items() if k != 'other'), 4)
        out['total'] = round(total, 4)
        return out


def format_budget(budget: dict[str, float]) -> str:
    """``'11.8 s = startup 2.9 + data_open 0.4 + ...'`` (spans under 5 ms left out)."""
    parts = [f'{k} {v:.1f}' if v >= 0.05 else f'{k} {v:.2f}'
             for k, v in budget.items() if k != 'total' and abs(v) >= 0.005]
    return f'{budget["total"]:.1f} s = ' + ' + '.join(parts)
