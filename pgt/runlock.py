"""One job per run directory: an OS lock on <run>/.lock, held by rank 0 from before anything in the directory is
written or cleaned until the job ends.

Two jobs on one directory (a SLURM requeue racing a manual restart, two starts with the same --output) would
interleave their checkpoints and logs, and one's start-up cleanup would delete the other's temporary files. The lock
is ``fcntl.flock``: the kernel releases it when the process ends however it ends (kill -9 included), so a stale lock
never blocks a restart. The holder's host, process id and start time are written into the file, for the message the
second job stops with. On NFS (v4) flock works across clients; Lustre needs its ``flock`` mount option.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import UsageError

LOCK_NAME = '.lock'


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UsageError naming the job that holds it. The directory must exist."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors='replace').strip() or 'a job that has not said which'
            os.close(fd)
            raise UsageError(f'{self.path.parent} is in use by another job ({holder}); wait for it to end, or stop '
                             f'it, before starting this one') from None
        os.ftruncate(fd, 0)
        os.write(fd, f'host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime("%Y-%m-%d %H:%M:%S")}'
                     .encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
