"""train.py on a machine whose writes fail as a node fails, or as slow storage delays them:

    python tests/faulty_writes.py kill:last.pth:2 [train.py options]    # SIGKILL half-way through the 2nd write
    python tests/faulty_writes.py slow:recovery.pth:8 [train.py options]  # every write of recovery.pth takes 8 s more

``kill`` dies half-way through the Nth write of the file (a partial temporary file is left behind); for a file that
is a hard link (best.pth, epoch_<E>.pth), after the link is made and before it is renamed into place. ``slow`` sleeps
before each write of the file, as an fsync to a loaded network filesystem does. Installs the hook of pgt.checkpoint
(``before_write``) and runs train.py's command."""
import os
import signal
import sys
import time

from pgt import checkpoint, train


def kill_at(name: str, nth: int):
    writes = [0]

    def before_write(path, file, data):
        if path.name != name:
            return
        writes[0] += 1
        if writes[0] == nth:
            if file is not None:
                file.write(data[:len(data) // 2])
                file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return before_write


def slow(name: str, seconds: float):
    def before_write(path, file, data):
        if path.name == name:
            time.sleep(seconds)
    return before_write


if __name__ == '__main__':
    mode, name, number = sys.argv[1].split(':')
    checkpoint.before_write = kill_at(name, int(number)) if mode == 'kill' else slow(name, float(number))
    sys.argv[1:] = sys.argv[2:]
    train.cli()
