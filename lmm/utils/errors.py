"""Errors a user can act on, and how the `lmm` command shows them.

An error whose class derives from `UserError` (a bad record, a missing or damaged file, a
checkpoint that does not fit the recipe, a mixture typo) is the user's to fix, and its message
says how. The command prints it as one paragraph and exits with code 2, without a traceback
(`LMM_DEBUG=1` or `--debug` shows it). Any other exception is a bug in lmm or a library and
keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys

DEBUG_ENV = "LMM_DEBUG"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Base of the errors whose message tells the user what to fix (no traceback needed)."""


class DataFileError(UserError, FileNotFoundError):
    """A data, benchmark or recipe file a run needs is missing."""


def is_user_error(err: BaseException) -> bool:
    """An lmm `UserError`, a missing file, or one of those re-raised from a DataLoader worker."""
    if isinstance(err, UserError | FileNotFoundError | IsADirectoryError | PermissionError):
        return True
    return user_error_in(err) is not None or _worker_error(err) is not None


def user_error_in(err: BaseException) -> BaseException | None:
    """The user error `err` is or was raised from (its `__cause__` / `__context__` chain):
    jsonargparse reports a constructor's failure (an `init_from` file that is damaged, a
    tokenizer folder that is missing) as "does not validate against any of the Union
    subtypes", the named error only as its cause."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError | FileNotFoundError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# torch re-raises a worker's exception as "Caught <Name> in DataLoader worker process N.\n
# Original Traceback (most recent call last): ... <module.Name>: <message>"; an exception whose
# constructor takes several arguments (BadRecordError) comes back as a RuntimeError.
_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process \d+")


def _worker_error(err: BaseException) -> str | None:
    """The message of a user error raised in a DataLoader worker, else None."""
    text = str(err)
    match = _WORKER.search(text)
    if match is None:
        return None
    name = match.group(1)
    user = {cls.__name__ for cls in _subclasses(UserError)} | {"FileNotFoundError"}
    if name not in user:
        return None
    lines = text.splitlines()
    for k in range(len(lines) - 1, -1, -1):  # the traceback's last line: `module.Name: msg`
        head, sep, _ = lines[k].partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name:
            return "\n".join([lines[k][len(head) + 2 :], *lines[k + 1 :]]).strip()
    return None


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def debug_requested(argv: list[str]) -> bool:
    """`--debug` among the arguments (removed from them) or `LMM_DEBUG` set."""
    flag = "--debug" in argv
    while "--debug" in argv:
        argv.remove("--debug")
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def user_message(err: BaseException) -> str:
    """The one-paragraph message of a user error."""
    err = user_error_in(err) or err
    message = _worker_error(err) or str(err) or type(err).__name__
    if isinstance(err, FileNotFoundError) and not isinstance(err, UserError) and err.filename:
        message = f"{err.strerror or 'not found'}: {err.filename}"
    return message


def report(err: BaseException) -> int:
    """Write a user error to stderr as lmm prints it; the exit code."""
    sys.stderr.write(
        f"lmm: error: {user_message(err)}\n(set {DEBUG_ENV}=1 or pass --debug for the traceback)\n"
    )
    return EXIT_USER_ERROR
