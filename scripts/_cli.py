"""The one error wrapper of the thin command-line entry points in ``scripts/``.

``run(main)`` turns the errors a user can cause (bad input file, bad config, bad option, a full
disk) into one clear ``error: ...`` line on stderr and exit code 2, and Ctrl-C into exit code
130, instead of a traceback.

The project's packages are installed by ``scripts/setup.sh`` (``pip install -e .``). A checkout
run without that install (the offline GPU host's runbook runs ``python3 scripts/train.py`` with
only ``PYTHONPATH`` set for ffcv) still works: the checkout's root is then added to the path,
here and nowhere else.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec('training') is None:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))

from model.fileio import DiskFullError  # noqa: E402

# Errors that mean "the user asked for something that can't be done", not a bug.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, DiskFullError)


def run(main) -> None:
    try:
        code = main()
    except USER_ERRORS as e:
        print(f'error: {e}', file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        code = 130
    sys.exit(code or 0)
