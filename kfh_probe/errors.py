"""The project's expected failures: one base class, caught by every command line.

A :class:`KFHError` is a failure the user can fix or has to know about -- bad input (an argument, a
file, a model folder), an unsupported model, files that do not belong together. Every command line
(``kfh-probe``, ``attnpo-train``) catches this class only, prints its message as one line
``PROG: error: MESSAGE`` on stderr and exits with code 2. Any other exception is a bug and keeps its
traceback. Subclasses also derive from ``ValueError`` or ``RuntimeError`` where callers catch those.

A library message names a setting as the library spells it, in backticks (`batch_size`: a parameter or
config field), never as a command-line flag, and the error lists the settings its message names in
``settings``; ``kfh-probe`` writes each as its flag (``--batch-size``, :func:`as_flags`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

EXIT_BAD_INPUT = 2
"""The exit code of a command that stopped on a :class:`KFHError`."""


class KFHError(Exception):
    """Base of every expected failure; the message names the setting or file (and line, id) at fault.

    Args:
        settings: the settings the message names (module docstring).
    """

    settings: tuple[str, ...] = ()

    def __init__(self, *args: object, settings: Iterable[str] = ()) -> None:
        super().__init__(*args)
        self.settings = tuple(settings)


class InputError(KFHError, ValueError):
    """An argument or input file the user can fix; the message names it."""


class NotInstalledError(KFHError, RuntimeError):
    """An optional package a requested feature runs on is missing; the message says how to install it."""


def listed(problems: list[str], limit: int = 20) -> str:
    """``problems`` on one line, ``"; "``-separated, the first ``limit`` of them and how many more."""
    more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def as_flags(message: str, settings: Iterable[str]) -> str:
    """``message`` with each of ``settings`` written as its command-line flag (`batch_size` -> ``--batch-size``)."""
    for name in settings:
        message = message.replace(f"`{name}`", "--" + name.replace("_", "-"))
    return message


def report_error(prog: str, err: KFHError, flags: bool = False) -> int:
    """Print ``err`` as the one line ``PROG: error: MESSAGE`` on stderr; returns the exit code 2.

    Args:
        flags: write the settings the message names as flags (a command line whose flags are the settings'
            names, :func:`as_flags`).
    """
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if flags:
        message = as_flags(message, err.settings)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
