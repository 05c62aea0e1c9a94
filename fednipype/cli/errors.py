"""Exit codes and the top-level error handler shared by fednipype's commands.

Every failure of a command becomes ONE line on stderr, ``<prog>: error: <message>``, naming
the file or argument and what was expected, and a distinct exit code (:data:`EXIT_CODES`). A
Python traceback is printed only with ``-v``. Light on purpose: ``fednipype-meta`` imports
this module and must run without the site's imaging stack.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn, TextIO

from fednipype.exceptions import (
    DisclosureError,
    FederationError,
    FednipypeError,
    PolicyError,
    PrivacyBudgetExceeded,
)

EXIT_OK = 0
#: An unexpected error: a bug in fednipype (the traceback is printed with ``-v``).
EXIT_INTERNAL = 1
#: A command line that cannot be used: unknown option, bad value, missing argument.
EXIT_USAGE = 2
#: Input that is not as expected: paths, datasets, images, tables, release files.
EXIT_INVALID_INPUT = 3
#: A privacy refusal: policy, ledger, epsilon/delta, budget or cohort size; nothing was spent.
EXIT_PRIVACY = 4
#: Some subjects failed and the others' outputs were written (participant level).
EXIT_PARTIAL = 5
#: A federated run could not start or complete: the SuperLink unreachable or refusing this
#: node (key, CA), or too few sites accepted or stayed (nothing written at the hub).
EXIT_FEDERATION = 6
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "unexpected error (a bug: run again with -v and report the traceback)",
    EXIT_USAGE: "usage error (unknown option, invalid argument value)",
    EXIT_INVALID_INPUT: "invalid input (a path, dataset, image, table or file as named)",
    EXIT_PRIVACY: "privacy refusal (policy, ledger, epsilon/delta, budget, cohort); "
    "nothing was spent",
    EXIT_PARTIAL: "partial failure: some subjects failed, the others' outputs are written",
    EXIT_FEDERATION: "federated run not completed (SuperLink unreachable or refusing, too few "
    "sites)",
    EXIT_INTERRUPTED: "interrupted",
}

#: Longest error line printed; longer messages keep their start and end around an ellipsis.
MAX_LINE = 600


class UsageError(FednipypeError):
    """An argument value that the command cannot use (found after parsing)."""


class PartialFailure(FednipypeError):
    """Some units of work failed; the others' results were written."""


def exit_epilog() -> str:
    """The exit codes as a ``--help`` epilog.

    >>> "  4   privacy refusal" in exit_epilog()
    True
    """
    lines = ["exit codes:"]
    lines += [f"  {code:<3} {text}" for code, text in EXIT_CODES.items()]
    return "\n".join(lines)


def one_line(message: object, limit: int = MAX_LINE) -> str:
    """A message on one line, at most ``limit`` characters (the middle elided).

    >>> one_line("a\\nb")
    'a b'
    >>> len(one_line("x" * 10_000_000)) <= MAX_LINE
    True
    """
    text = " ".join(str(message).split())
    if len(text) <= limit:
        return text
    head = (limit * 2) // 3
    tail = limit - head - 5
    return f"{text[:head]} […] {text[-tail:]}"


def exit_code_for(error: BaseException) -> int:
    """The exit code of an exception (see :data:`EXIT_CODES`).

    >>> exit_code_for(PrivacyBudgetExceeded("x")), exit_code_for(OSError("x"))
    (4, 3)
    """
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, PartialFailure):
        return EXIT_PARTIAL
    if isinstance(error, PolicyError | PrivacyBudgetExceeded | DisclosureError):
        return EXIT_PRIVACY
    if isinstance(error, FederationError):
        return EXIT_FEDERATION
    if isinstance(error, FednipypeError | OSError):
        return EXIT_INVALID_INPUT
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_INTERNAL


def describe(error: BaseException) -> str:
    """The user-facing text of an exception, naming the file for OS errors."""
    if isinstance(error, FednipypeError):
        return str(error)
    if isinstance(error, OSError):
        where = error.filename if error.filename is not None else ""
        reason = error.strerror or str(error)
        return f"{where}: {reason}" if where else reason
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"unexpected {type(error).__name__}: {error} (a bug; run with -v for the traceback)"


def report(prog: str, message: object, *, stream: TextIO | None = None) -> None:
    """Print ``<prog>: error: <message>`` as one line on stderr."""
    print(f"{prog}: error: {one_line(message)}", file=stream or sys.stderr)


def guarded(prog: str, body: Callable[[], int], *, verbose: int = 0) -> int:
    """Run ``body`` and turn any exception into one error line and an exit code.

    Parameters
    ----------
    prog : str
        Name of the command, first on the error line.
    body : callable
        The command's work, returning its exit code.
    verbose : int
        With 1 or more, the traceback is printed before the error line.

    Returns
    -------
    int
        ``body``'s exit code, or the exception's (:func:`exit_code_for`).
    """
    try:
        return body()
    except SystemExit:
        raise
    except BaseException as error:  # the top of the program: one line per error
        if verbose:
            traceback.print_exc(file=sys.stderr)
        report(prog, describe(error))
        return exit_code_for(error)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (exit code 2), not the usage text."""

    def error(self, message: str) -> NoReturn:
        report(self.prog, f"{message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` only for options with a default that help does not state.

    The epilog keeps its line breaks (the exit-code table).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default:" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"
