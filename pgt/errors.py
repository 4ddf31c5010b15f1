"""User-facing errors: one readable line on stderr and exit code 2; the traceback only with --debug."""
from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

EXIT_USAGE = 2


class RunError(Exception):
    """An error reported as one line, without a traceback, with its own exit code."""
    exit_code = 1


class UsageError(RunError):
    """Bad input from the user (a recipe, an option, the data): reported as one line, exit code 2."""
    exit_code = EXIT_USAGE


class TrainingDiverged(RunError):
    """Too many consecutive steps with a non-finite loss or gradient."""
    exit_code = 3


class Preempted(RunError):
    """A preemption signal arrived; a recovery checkpoint was written. Not a failure: the job should be requeued."""
    exit_code = 75  # EX_TEMPFAIL


class DataError(UsageError):
    """An unreadable or corrupt input file; the message names the file."""


def one_line(error: BaseException) -> str:
    """The message of an error as one line. A DataLoader worker re-raises with the worker's traceback in the text;
    its last line holds the original message after the exception's name."""
    text = str(error).strip()
    if 'Traceback' in text:
        text = re.sub(r'^[\w.]*Error:\s*', '', text.splitlines()[-1])
    return ' '.join(text.split())


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; a RunError becomes ``error: <message>`` on stderr and its exit code (2 for bad input),
    with the traceback only under ``--debug``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        sys.exit(main(argv) or 0)
    except RunError as error:
        if '--debug' in argv:
            raise
        prefix = 'stopped' if isinstance(error, Preempted) else 'error'
        print(f'{prefix}: {one_line(error)}', file=sys.stderr)
        sys.exit(error.exit_code)
