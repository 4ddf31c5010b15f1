"""train.py killed with SIGKILL in the middle of writing a file of its run, as a node failure kills it:

    python tests/crash_writing.py last.pth:2 [train.py options]

dies half-way through the second write of last.pth (a partial temporary file is left behind); for a file that is a
hard link (best.pth, epoch_<N>.pth), after the link is made and before it is renamed into place. Installs the hook
of pgt.checkpoint (``before_write``) and runs train.py's command."""
import os
import signal
import sys

from pgt import checkpoint, train


def crash_at(name: str, nth: int):
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


if __name__ == '__main__':
    name, _, nth = sys.argv[1].partition(':')
    checkpoint.before_write = crash_at(name, int(nth or 1))
    sys.argv[1:] = sys.argv[2:]
    train.cli()
