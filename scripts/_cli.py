"""The one error wrapper of the thin command-line entry points in ``scripts/``.

``run(main)`` turns the errors a user can cause (bad input file, bad config, bad option, a full
disk, an unwritable folder) into one clear ``error: ...`` line on stderr and exit code 2, and
Ctrl-C into exit code 130, instead of a traceback. What counts as the user's: the project's own
errors (all subclasses of ``model.errors.UserError``) and the OS errors that name a path the
user gave (no such file, permission denied, read-only file system, a file where a folder should
be). Anything else -- a ``ValueError`` from numpy, a ``RuntimeError`` from torch -- is a bug and
keeps its traceback (exit code 1), so it is not mistaken for a user error.

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

import errno  # noqa: E402

from model.project import PROJECT_ROOT as ROOT  # noqa: E402  (the scripts' --out defaults)

from model.errors import UserError  # noqa: E402

# OS errors about a path the user gave (not, say, a broken pipe or a full pipe buffer inside).
PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
               errno.EEXIST, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}


def user_error_line(e: BaseException) -> str | None:
    """The one line for an error the user caused, or None for a bug."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.filename is not None and e.errno in PATH_ERRNOS:
        return f'{e.filename}: {e.strerror}'
    return None


def call(main, argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit code, with user errors printed as one line (tests call this
    in-process; ``argv=None`` reads the command line)."""
    try:
        return main(argv) or 0
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise  # a bug: its traceback
        print(f'error: {line}', file=sys.stderr)
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
