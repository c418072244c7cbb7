"""The one error wrapper of the thin command-line entry points in ``scripts/``.

``run(main)`` turns the errors a user can cause (bad input file, bad config, bad option, a full
disk) into one clear ``error: ...`` line on stderr and exit code 2, and Ctrl-C into exit code
130, instead of a traceback.

The project's packages are installed by ``scripts/setup.sh`` (``pip install -e .``). A script
always runs the code of the checkout it belongs to: where the packages are not installed (the
offline GPU host's runbook runs ``python3 scripts/train.py`` with only ``PYTHONPATH`` set for
ffcv) or installed from another checkout sharing the environment, this checkout's root goes
first on the path -- here, and nowhere else.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.find_spec('training')
if _spec is None or Path(_spec.origin).resolve().parents[1] != ROOT:
    sys.path.insert(0, str(ROOT))

from model.fileio import DiskFullError  # noqa: E402

# Errors that mean "the user asked for something that can't be done", not a bug.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, DiskFullError)


def call(main, argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit code, with user errors printed as one line (tests call this
    in-process; ``argv=None`` reads the command line)."""
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


def run(main, *, fast_exit: bool = False) -> None:
    """Exit with ``main``'s code. ``fast_exit``: after a success, skip the interpreter's teardown
    (0.4-1.6 s of freeing torch's, numba's and ffcv's modules on our 2-core machine, after the
    last line of the run) with ``os._exit`` once the output is flushed; only for entry points
    whose work is all on disk when ``main`` returns (every file written, fsynced and closed).
    Errors exit the usual way (atexit handlers run)."""
    code = call(main)
    if fast_exit and code == 0:
        import os
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
