"""Errors a user can cause, shared by the command line and the commands below it.

An error of one of these kinds is reported as one line ``diffrestore: error: ...`` and exit status 2
(see ``cli.main``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

#: exception types that mean "bad input": reported in one line, never with a traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, FloatingPointError)

#: errno values of an output that cannot be written: the user's disk or folder, reported in one line
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}


class UserError(ValueError):
    """A bad input or option, with a message meant for the user."""


class EvalError(UserError):
    """A problem with the evaluation's input or run folder."""


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is reported as a user error (bad input, or a full / read-only disk)."""
    return isinstance(err, USER_ERRORS) or (isinstance(err, OSError) and err.errno in DISK_ERRORS)
