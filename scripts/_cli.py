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

_CHECKOUT = Path(__file__).resolve().parents[1]
_spec = importlib.util.find_spec('training')
if _spec is None or Path(_spec.origin).resolve().parents[1] != _CHECKOUT:
    sys.path.insert(0, str(_CHECKOUT))

from model.fileio import DiskFullError  # noqa: E402
from model.project import PROJECT_ROOT as ROOT  # noqa: E402  (the scripts' --out defaults)

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


def run(main) -> None:
    sys.exit(call(main))
