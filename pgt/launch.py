"""torchrun for preemptible clusters: ``pgt-torchrun`` (or ``python -m pgt.launch``) takes torchrun's command line
and runs torch.distributed.run with what a cluster job needs of it.

    pgt-torchrun --standalone --nproc-per-node 4 train.py -c configs/paper/resnet50-cosine-pgt.yaml ...

- Every stop signal reaches the ranks: SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 (SLURM's warning signal, which
  torchrun's own list leaves out: it then ends torchrun with exit code 138 while the ranks run on).
- Time for the stop checkpoint: torchrun forwards the signal, waits ``--shutdown-timeout`` seconds (30 by default)
  and kills the ranks. Here the default is STOP_GRACE_SECONDS, within the 300 s that SLURM's
  ``--signal=B:USR1@300`` leaves before its own kill; a rank needs at most --signal-check-interval steps to agree on
  the stop, then writes recovery.pth (one serialisation, one fsync).
- The ranks' exit code: torchrun ends a signalled run with its SignalException traceback and exit code 1. Here each
  rank reports its exit code (PGT_EXIT_DIR) and the launcher exits with the ranks' code, in one line: 75 when they
  stopped and saved, so that a job script requeues exactly then.
- No restart after a final failure: ``--max-restarts`` restarts the ranks after any failure. A rank that ends with
  bad input (exit 2) or a diverged run (exit 3) leaves a marker, and the restarted ranks exit at once with the same
  line and code instead of starting again (``final_failure``).
"""
from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile
from pathlib import Path

STOP_SIGNALS = 'SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1'
STOP_GRACE_SECONDS = 240
FINAL_EXIT_CODES = (2, 3)  # bad input, a diverged run: the same again on every restart
EXIT_DIR_ENV = 'PGT_EXIT_DIR'


# ---- the rank's side (called by train.py's command)

def _attempt() -> str | None:
    """This rank's torchrun attempt, 'run id/agent pid/restart', or None outside torchrun. The agent's pid makes a
    later torchrun with the same --rdzv-id (a requeued job) another run."""
    run_id = os.environ.get('TORCHELASTIC_RUN_ID')
    return None if run_id is None else f'{run_id}/{os.getppid()}/{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}'


def _marker() -> Path:
    run_id = os.environ.get('TORCHELASTIC_RUN_ID', '')
    return Path(tempfile.gettempdir()) / f'pgt-final-{os.getuid()}-{run_id}-{os.getppid()}'


def final_failure() -> tuple[int, str] | None:
    """(exit code, error line) of a final failure of an earlier attempt of this torchrun run, which a restarted
    rank repeats instead of running again; None outside torchrun or on its first attempt."""
    if _attempt() is None or os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0':
        return None
    try:
        code, line = _marker().read_text().split('\n', 1)
    except (OSError, ValueError):
        return None
    return int(code), line


def report_exit(code: int, line: str | None) -> None:
    """A rank's exit, for the launcher: its code in PGT_EXIT_DIR, and the marker of a final failure."""
    attempt = _attempt()
    if attempt is None:
        return
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder:
        name = f'{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}-{os.environ.get("RANK", "0")}'
        Path(folder, name).write_text(str(code))
    if code in FINAL_EXIT_CODES and line:
        _marker().write_text(f'{code}\n{line}')


# ---- the launcher's side

def ranks_exit_code(folder: Path) -> int | None:
    """The exit code the ranks of the last attempt reported: the one they agree on, else the most common; None if
    none reported."""
    attempts: dict[int, list[int]] = collections.defaultdict(list)
    for path in folder.iterdir():
        attempt, _, _ = path.name.partition('-')
        attempts[int(attempt)].append(int(path.read_text()))
    if not attempts:
        return None
    return collections.Counter(attempts[max(attempts)]).most_common(1)[0][0]


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    folder = Path(tempfile.mkdtemp(prefix='pgt-launch-'))
    os.environ[EXIT_DIR_ENV] = str(folder)
    # torchrun reads an option's default from PET_<OPTION> (its command line still overrides it); a torch without
    # --signals-to-handle reads the list from TORCHELASTIC_SIGNALS_TO_HANDLE, one without --shutdown-timeout keeps 30 s.
    for variable, value in (('PET_SIGNALS_TO_HANDLE', STOP_SIGNALS), ('TORCHELASTIC_SIGNALS_TO_HANDLE', STOP_SIGNALS),
                            ('PET_SHUTDOWN_TIMEOUT', str(STOP_GRACE_SECONDS))):
        os.environ.setdefault(variable, value)
    try:
        torchrun(argv)
        return 0
    except SignalException as error:
        code = ranks_exit_code(folder)
        print(f'pgt-torchrun: {error.sigval.name}: the ranks exited with code {code}', file=sys.stderr)
        return 128 + int(error.sigval) if code is None else code
    except ChildFailedError:  # torchrun has printed which rank failed and how
        code = ranks_exit_code(folder)
        return 1 if code in (None, 0) else code
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def cli() -> None:
    """The ``pgt-torchrun`` console command (and ``python -m pgt.launch``)."""
    sys.exit(main(sys.argv[1:]))


if __name__ == '__main__':
    cli()
