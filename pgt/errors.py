"""User-facing errors: one readable line on stderr and exit code 2; the traceback only with --debug."""
from __future__ import annotations

import argparse
import difflib
import multiprocessing
import re
import sys
from typing import Callable, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended


class RunError(Exception):
    """An error reported as one line, without a traceback, with its own exit code."""
    exit_code = 1


class UsageError(RunError):
    """Bad input from the user (a recipe, an option, the data): reported as one line, exit code 2."""
    exit_code = EXIT_USAGE


class LoaderFailed(RunError):
    """A data loader worker died, or delivered no batch within --loader-timeout seconds: a restart may succeed."""
    exit_code = 1


class TrainingDiverged(RunError):
    """Too many consecutive steps with a non-finite loss or gradient."""
    exit_code = 3


class Preempted(RunError):
    """A preemption signal arrived; a recovery checkpoint was written. Not a failure: the job should be requeued."""
    exit_code = 75  # EX_TEMPFAIL


class StoppedDuringStartUp(BaseException):
    """A preemption signal before training began: nothing to save, so the process stops at once. A BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` in the code it interrupts can swallow it."""
    exit_code = Preempted.exit_code


class DataError(UsageError):
    """An unreadable or corrupt input file; the message names the file."""


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default, where there is one to show (not None or False, and not already named by
    the help text); descriptions keep their own line breaks."""

    def _get_help_string(self, action):
        text = action.help or ''
        if (action.default is None or action.default is False or action.default in (argparse.SUPPRESS, [])
                or not action.option_strings or 'default' in text):
            return text
        shown = ' '.join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f'{text} (default: {shown})'.lstrip()


class CliParser(argparse.ArgumentParser):
    """The argument parser of every program of the suite: no abbreviations (``--smooth`` must not silently mean
    ``--smoothing``), defaults in --help, and a bad command line is one line and exit code 2 (through run_cli), not
    argparse's usage dump, with the closest option names for a misspelt one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        kwargs.setdefault('formatter_class', DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f'{message}{self._suggestions(message)} (see --help)')

    def _suggestions(self, message: str) -> str:
        """'; did you mean --lr?' for each unrecognized option that is close to one of this parser's."""
        if not message.startswith('unrecognized arguments:'):
            return ''
        known = [option for action in self._actions for option in action.option_strings if option.startswith('--')]
        hints = {}
        for word in message.split(':', 1)[1].split():
            close = difflib.get_close_matches(word.split('=')[0], known, n=1, cutoff=0.7) if word.startswith('--') \
                else []
            if close:
                hints[word] = close[0]
        if len(hints) == 1:
            return f'; did you mean {next(iter(hints.values()))}?'
        return f'; did you mean {", ".join(f"{to} for {given}" for given, to in hints.items())}?' if hints else ''


def one_line(error: BaseException) -> str:
    """The message of an error as one line. A DataLoader worker re-raises with the worker's traceback in the text;
    its last line holds the original message after the exception's name."""
    text = str(error).strip()
    if 'Traceback' in text:
        text = re.sub(r'^[\w.]*Error:\s*', '', text.splitlines()[-1])
    return ' '.join(text.split())


def end_worker_processes() -> None:
    """End the DataLoader workers (daemonic child processes) before the interpreter exits. Workers ignore SIGTERM, so
    that a signal to the whole process group leaves the rank to handle it (pgt.preemption); but multiprocessing ends
    daemonic children at exit with SIGTERM and then waits for them, which would wait forever. They only read images:
    SIGKILL loses nothing."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None,
            on_exit: Callable[[int, str | None], None] | None = None) -> None:
    """Run ``main(argv)``; a RunError becomes ``error: <message>`` on stderr and its exit code (2 for bad input),
    with the traceback only under ``--debug``. Worker processes are ended however ``main`` ends. ``on_exit`` hears
    the exit code and the line printed (None when none was)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    line = None
    try:
        code = main(argv) or 0
    except (RunError, StoppedDuringStartUp) as error:
        if '--debug' in argv:
            raise
        prefix = 'stopped' if isinstance(error, (Preempted, StoppedDuringStartUp)) else 'error'
        line = f'{prefix}: {one_line(error)}'
        code = error.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one where no handler asked for a graceful stop
        if '--debug' in argv:
            raise
        line, code = 'stopped: interrupted (Ctrl-C); nothing more was saved', EXIT_INTERRUPTED
    finally:
        end_worker_processes()
    if line is not None:
        print(line, file=sys.stderr)
    if on_exit is not None:
        on_exit(code, line)
    sys.exit(code)
