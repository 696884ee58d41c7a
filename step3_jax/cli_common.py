"""Plumbing shared by the ``step3-jax`` commands: one-line errors, exit codes, ``--debug``.

Bad input (a flag out of range, a missing file, an unknown name) prints ONE line on stderr,
``step3-jax: error: ...``, and exits with code 2; an unexpected failure prints one line and
exits with 1. ``--debug`` (or ``STEP3_JAX_DEBUG=1`` in the environment) lets the exception
through instead, with its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2  # bad input: the convention argparse uses for usage errors
EXIT_INTERNAL = 1  # anything else
DEBUG_ENV = "STEP3_JAX_DEBUG"


class UsageError(Exception):
    """Input from the command line that cannot be used; the message names the flag."""


# Exceptions that mean "the input was wrong": the library raises ValueError naming the
# argument and the expected range, and missing files raise FileNotFoundError.
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (one line, exit 2, testable via main)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())  # multi-line messages collapse to one line
    return text or type(err).__name__


def report(prog: str, err: BaseException, code: int) -> int:
    """Prints ``prog: error: message`` on stderr and returns ``code``."""
    if code == EXIT_USAGE:
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
    else:
        print(
            f"{prog}: error: {type(err).__name__}: {_one_line(err)} "
            f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
    return code


def run_guarded(handler: Callable[[], int], prog: str, debug: bool) -> int:
    """Runs ``handler()``; turns exceptions into one stderr line + exit code unless debugging."""
    try:
        return handler()
    except KeyboardInterrupt:
        if debug:
            raise
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        return report(prog, e, EXIT_USAGE)
    except Exception as e:  # noqa: BLE001 -- the one place that turns crashes into one line
        if debug:
            raise
        return report(prog, e, EXIT_INTERNAL)


# argparse `type=` converters: the message is what the user sees after "argument --flag:".
def positive_int(text: str) -> int:
    return _checked_int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _checked_int(text, 0, "an integer >= 0")


def port(text: str) -> int:
    """A TCP port: the socket layer would take 70000 as 70000 - 65536 without a word."""
    return _checked_int(text, 1, "a port in [1, 65535]", high=65535)


def _checked_int(text: str, low: int, what: str, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _float(text: str) -> float:
    """A finite number: inf and nan are no value for a flag (a timeout of inf overflowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
