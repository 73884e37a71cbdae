"""The one exception type the CLI turns into a one-line message (exit code 2), and how messages show paths."""

from __future__ import annotations

import errno
import os
from typing import Any

VALUE_LIMIT = 60  # characters of a value's repr a message shows
MESSAGE_LIMIT = 1000  # characters of a whole message; the middle of a longer one is elided


class UserError(Exception):
    """A problem with what the user gave us (a path, a spec, a config value, a checkpoint).

    The message must say what is wrong and how to fix it, in one line.
    """


class Interrupted(Exception):
    """A run stopped on SIGINT/SIGTERM after saving its state; the message says how to resume."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


def shown(path: str | os.PathLike) -> str:
    """A path as a message should print it: as is when every character is visible and nothing surrounds it,
    else quoted with escapes, so a space, a BOM or a zero-width character cannot hide in the message."""
    text = os.fspath(path)
    if text and text.isprintable() and " " not in text:
        return text
    return repr(text)


def one_line(message: str) -> str:
    """The message with every invisible or line-breaking character escaped, so it prints as one readable line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)


def os_error_text(err: OSError) -> str:
    """'No space left on device (ENOSPC)': the reason an operating-system call failed, with its errno name."""
    name = errno.errorcode.get(err.errno, str(err.errno)) if err.errno is not None else type(err).__name__
    return f"{err.strerror or err} ({name})"


def cut(value: Any, limit: int = VALUE_LIMIT) -> str:
    """repr(value) for a message, at most `limit` characters: a pasted file or a huge list stays one short line."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}…({len(text)} chars)"


def clipped(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """The message with its middle elided beyond `limit` characters; the end, which says how to fix it, is kept."""
    if len(message) <= limit:
        return message
    head, tail = limit * 2 // 3, limit // 3
    return f"{message[:head]} …[{len(message) - head - tail} characters cut]… {message[-tail:]}"
