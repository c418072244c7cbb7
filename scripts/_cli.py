"""Shared bits of the thin command-line entry points in ``scripts/``.

``run(main)`` turns the errors a user can cause (bad input file, bad config, bad option) into
one clear line on stderr and exit code 2, and Ctrl-C into exit code 130, instead of a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as `python scripts/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

# Errors that mean "the user asked for something that can't be done", not a bug.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


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
