"""The one base class of the errors a user can cause (a bad config, input file, option or output
folder, a full disk): ``scripts/_cli.py`` prints them as one ``error: ...`` line with exit code 2.
Anything else is a bug and keeps its traceback.

Each project error subclasses :class:`UserError` *and* keeps its historical base (``ValueError``,
``OSError``), so callers that catch those still work. Standard library only: the app and an
exported Space copy ``model/``.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user asked for cannot be done; ``str()`` is one line naming what and why."""
