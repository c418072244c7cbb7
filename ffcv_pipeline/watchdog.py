"""Turns a dead ``.beton`` writer process into an exception in the main thread.

ffcv's ``DatasetWriter`` waits forever when one of its worker processes dies (a full disk, a
kill); :class:`WorkerWatchdog` notices and wakes the main thread (``ffcv_pipeline/writer.py``).
"""
from __future__ import annotations

import ctypes
import itertools
import multiprocessing
import multiprocessing.queues
import os
import re
import signal
import sys
import threading
from multiprocessing import shared_memory
from pathlib import Path

from model.fileio import is_disk_full


class WorkerFailed(Exception):
    """Raised in the main thread by :class:`WorkerWatchdog` when a writer process died."""


class WorkerWatchdog:
    """ffcv's writer waits forever for its counter (or its allocation queue) when a worker
    process dies (disk full: a SIGBUS on its memory-mapped output; killed). This thread watches
    the writer's processes (recorded as ffcv starts them: ``multiprocessing.active_children``
    would reap a dead one before we saw its exit code) and, when one exits with an error, sends
    the main thread a real signal (which also breaks a blocking wait, unlike
    ``_thread.interrupt_main``) whose handler raises :class:`WorkerFailed`; that turns into a
    clear error instead of a hang. The signal is SIGUSR1 with our own handler, not SIGINT: a
    process started in the background by a script (``cmd &``, nohup) inherits SIGINT ignored,
    and the write then hung forever on a full disk (tests/test_write_datasets.py runs it so).
    The signal is sent only while the write runs (a lock orders it before the stop in
    ``__exit__``), and only to a main thread that runs the write: off the main thread nothing is
    signalled (a stray exception there would hit unrelated code) and ffcv's own wait remains."""

    def __init__(self):
        self.failed: int | None = None
        self.processes: list = []
        self.queues: list = []  # ffcv's work and allocation queues, handed to each process
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._previous = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        watchdog = self

        class Recorded(multiprocessing.Process):
            def start(self):
                watchdog.processes.append(self)
                watchdog.queues += [a for a in self._args if isinstance(a, multiprocessing.queues.Queue)
                                    and all(a is not q for q in watchdog.queues)]  # (start() drops _args)
                super().start()

            def run(self):  # a full disk: exit 1 quietly (the parent says it in one line)
                die_with_parent(self._parent_pid)
                try:
                    super().run()
                except OSError as e:
                    if not is_disk_full(e):
                        raise
                    sys.exit(1)
        self.process_class = Recorded

    def _run(self):
        while not self._stop.wait(0.1):
            for p in list(self.processes):
                if p.exitcode not in (None, 0):
                    with self._lock:
                        if self._stop.is_set():
                            return
                        self.failed = p.exitcode
                        if self._previous is not None:  # our handler is installed (main thread)
                            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
                    return

    def abandon(self) -> None:
        """After a failure: stop the live workers, and let the process exit although ffcv's work
        queue still holds chunks (its feeder thread blocks on a full pipe that no dead worker
        reads; exiting would join it forever: 10,000+ images on a full disk hung so)."""
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for q in self.queues:
            q.cancel_join_thread()

    @staticmethod
    def _raise(signum, frame):
        raise WorkerFailed

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGUSR1, self._raise)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        try:
            with self._lock:  # no signal is sent after this
                self._stop.set()
            self._thread.join()  # a signal sent just before is handled in here (WorkerFailed)
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGUSR1, self._previous)
                self._previous = None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this (forked) process when its parent dies. A converter killed
    with ``kill -9`` or by the OOM killer otherwise left its ffcv workers blocked forever on a
    work queue that no one feeds (seen for minutes, ~700 MB each). Linux only; elsewhere (where
    there is no ffcv) nothing happens."""
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the prctl took effect
        os._exit(1)


# ffcv's writer keeps its metadata in a POSIX shared-memory segment (/dev/shm) with a random name,
# freed only when the write succeeds. We give it a name that says whose it is, so that the next
# run frees the segment of a run that was killed.
SHM_PREFIX = 'cifar100-ffcv-writer'
_SHM_NAME = re.compile(rf'^{SHM_PREFIX}-(\d+)-\d+$')
SHM_DIR = Path('/dev/shm')
_counter = itertools.count()


class NamedSharedMemory:
    """Stands in for ``ffcv.writer.shared_memory``: its segments are named
    ``cifar100-ffcv-writer-<pid>-<n>``."""

    @staticmethod
    def SharedMemory(name=None, create=False, size=0):  # noqa: N802 (ffcv's spelling)
        if create and name is None:
            name = f'{SHM_PREFIX}-{os.getpid()}-{next(_counter)}'
        return shared_memory.SharedMemory(name=name, create=create, size=size)


def remove_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the segments of converter processes that no longer run; returns their names."""
    removed = []
    try:
        entries = list(shm_dir.iterdir())
    except OSError:  # no /dev/shm (not Linux)
        return removed
    for p in entries:
        m = _SHM_NAME.match(p.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        try:
            p.unlink()
            removed.append(p.name)
        except OSError:
            pass
    return removed
