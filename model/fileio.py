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

from .errors import UserError

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(UserError, OSError):
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


class NotWritableError(UserError, OSError):
    """A folder cannot be written (read-only file system, no permission, a file where a folder
    should be); ``str()`` is one line naming the folder and the cause."""

    def __init__(self, folder: str | os.PathLike, cause: OSError, what: str = 'folder'):
        self.folder, self.cause = Path(folder), cause
        why = cause.strerror or str(cause)
        if cause.errno in (errno.ENOTDIR, errno.EEXIST):  # which part of the path is a file
            culprit = next((q for q in (self.folder, *self.folder.parents)
                            if q.exists() and not q.is_dir()), None)
            if culprit is not None:
                why = f'{culprit} is a file, not a folder'
        super().__init__(cause.errno or errno.EACCES, f'{self.folder}: {what} is not writable ({why})')

    def __str__(self) -> str:
        return self.strerror


def check_writable_dir(folder: str | os.PathLike, what: str = 'output folder') -> Path:
    """Make ``folder`` (and its parents) and create and remove a file in it, before any work
    starts; :class:`NotWritableError` (or :class:`DiskFullError`) in one line if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix='.write-test-')
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFullError(folder / '.write-test', e) from None
        raise NotWritableError(folder, e, what) from None
    return folder


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
        raise (DiskFullError(path, e) if is_disk_full(e) else NotWritableError(path.parent, e)) from None
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
