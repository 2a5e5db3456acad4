"""The project's expected failures: one base class, caught by every command line.

A :class:`KFHError` is a failure the user can fix or has to know about -- bad input (an argument, a
file, a model folder), an unsupported model, files that do not belong together. Every command line
(``kfh-probe``, ``attnpo-train``) catches this class only, prints its message as one line
``PROG: error: MESSAGE`` on stderr and exits with code 2. Any other exception is a bug and keeps its
traceback. Subclasses also derive from ``ValueError`` or ``RuntimeError`` where callers catch those.
"""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2
"""The exit code of a command that stopped on a :class:`KFHError`."""


class KFHError(Exception):
    """Base of every expected failure; the message names the argument or file (and line, id) at fault."""


class InputError(KFHError, ValueError):
    """An argument or input file the user can fix; the message names it."""


class NotInstalledError(KFHError, RuntimeError):
    """An optional package a requested feature runs on is missing; the message says how to install it."""


def listed(problems: list[str], limit: int = 20) -> str:
    """``problems`` on one line, ``"; "``-separated, the first ``limit`` of them and how many more."""
    more = f"; ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def report_error(prog: str, err: KFHError) -> int:
    """Print ``err`` as the one line ``PROG: error: MESSAGE`` on stderr; returns the exit code 2."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
