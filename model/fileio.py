"""The one way this project writes a file: to a temporary name in the same folder, then
``os.replace``. Readers never see a half-written file, a crash mid-write keeps the previous
version, and a full disk becomes one clear :class:`DiskFullError` with no temporary file left.

    atomic_write(path, lambda f: torch.save(obj, f))      # any writer of a binary file object
    atomic_write_text(path, text)

Standard library only: the app (a Hugging Face Space copies ``model/``) uses it too.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """Writing ``path`` failed because the disk (or quota) is full; ``str()`` is one line."""

    def __init__(self, path: str | os.PathLike, cause: OSError | None = None,
                 hint: str = 'free some space and run again'):
        self.path, self.cause = Path(path), cause
        why = os.strerror(cause.errno) if cause is not None and cause.errno else 'No space left on device'
        try:
            why += f'; {shutil.disk_usage(self.path.parent).free / 2**20:,.1f} MiB free on {self.path.parent}'
        except OSError:
            pass
        super().__init__(errno.ENOSPC, f'{self.path}: the disk is full ({why}); {hint}')

    def with_hint(self, hint: str) -> 'DiskFullError':
        return DiskFullError(self.path, self.cause, hint)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and (isinstance(e, DiskFullError) or e.errno in DISK_FULL_ERRNOS)


class _WatchedFile:
    """A binary file that remembers the OSError its ``write`` raised: ``torch.save`` reports a
    full disk as a bare ``RuntimeError`` ("unexpected pos ..."), losing the errno."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # flush, tell, seek, fileno, ...
        return getattr(self._f, name)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it to
    ``path`` (permissions as for a new file). On any failure the temporary file is removed
    and ``path`` keeps its previous content; a full disk raises :class:`DiskFullError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    except OSError as e:
        raise (DiskFullError(path, e) if is_disk_full(e) else e) from None
    watched = None
    try:
        with os.fdopen(fd, 'wb') as f:
            watched = _WatchedFile(f)
            write(watched)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = watched.error if watched is not None and watched.error is not None else e
        if is_disk_full(cause) and not isinstance(e, DiskFullError):
            raise DiskFullError(path, cause) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))
