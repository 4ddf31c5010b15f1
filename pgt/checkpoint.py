"""Checkpoints and run directories that survive crashes, full disks and preemption.

Files in a run directory: ``last.pth`` (end of the latest epoch), ``best.pth`` (best eval top-1), ``epoch_<N>.pth``
(end of epoch N, every --checkpoint-interval epochs) and ``recovery.pth`` (every --recovery-interval steps within an
epoch, and on a preemption signal). Each holds everything needed to continue the same trajectory: the model weights
under timm's key ``state_dict`` (with the model name under ``arch``), optimizer, gradient scaler, the position, each
rank's metric accumulators of a partial epoch and RNG states. The position is counted as timm and summary.csv count
epochs: ``epoch`` is the (0-based) epoch the weights belong to, ``step`` the updates done in it out of
``epoch_steps``, all of them at an epoch end; ``version`` 2 tells timm's own resume that the next epoch is
``epoch + 1``. The learning rate is a function of the position (train.py steps the scheduler to it), so no scheduler
state is stored. timm reads the weights as they are: ``timm.create_model(name, checkpoint_path='best.pth')``, timm's
validate.py and ``load_checkpoint``.

Every file holds only tensors, numbers, strings, lists and dicts, so it is read with ``torch.load(weights_only=True)``:
loading a checkpoint never runs code from it.

Writes are atomic (temporary file, fsync, rename): a crash or a full disk at any moment leaves the old file or the
new one, never a truncated one, and a failed write removes its temporary file. The state of an epoch end is
serialised and written once; best.pth and epoch_<N>.pth are hard links to that one file (a copy where the filesystem
has no hard links), renamed into place in the order best.pth, epoch_<N>.pth, last.pth, after summary.csv. No file is
ever modified in place, so a link never sees a later write. ``--resume auto`` continues from recovery.pth or
last.pth: the position in last.pth is renamed into place last, so a crash anywhere before it repeats the epoch (from
the recovery checkpoint or the previous last.pth), which writes the others again, identically.
"""
from __future__ import annotations

import argparse
import errno
import io
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

from .errors import RunError, UsageError
from .runlock import RunLock

log = logging.getLogger(__name__)
REQUIRED_KEYS = ('state_dict', 'optimizer', 'epoch', 'step')
CHECKPOINT_VERSION = 2  # timm's: a checkpoint's 'epoch' is the last epoch it trained, so training resumes at epoch + 1


class CheckpointWriteError(RunError):
    """A file of the run could not be written (full disk, quota, I/O error); the previous version is intact."""
    exit_code = 1


# ---- RNG states as tensors (no numpy arrays or tuples to unpickle)

def rng_state() -> dict:
    """This process's RNG states: torch (CPU and the current CUDA device only), Python's and numpy's."""
    version, python_state, gauss = random.getstate()
    _, numpy_key, numpy_pos, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    state = {'torch': torch.get_rng_state(),
             'python': {'version': version, 'state': torch.tensor(python_state, dtype=torch.int64), 'gauss': gauss},
             'numpy': {'key': torch.from_numpy(numpy_key.astype(np.int64)), 'pos': int(numpy_pos),
                       'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    python = state['python']
    random.setstate((python['version'], tuple(python['state'].tolist()), python['gauss']))
    numpy = state['numpy']
    np.random.set_state(('MT19937', numpy['key'].numpy().astype(np.uint32), numpy['pos'], numpy['has_gauss'],
                         numpy['cached_gaussian']))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def rank_state(state: dict, rank: int, world_size: int) -> tuple[dict, dict | None]:
    """This rank's (RNG state, partial-epoch meters) from a checkpoint's per-rank entries. At the world size that
    wrote it, each rank gets its own. At another world size the trajectory cannot be the same anyway: rank 0 takes
    the meters of all old ranks summed (so the epoch's totals stay right) and the others start theirs at zero."""
    ranks = state['ranks']
    if len(ranks) == world_size:
        return ranks[rank]['rng'], ranks[rank]['meters']
    rng = ranks[rank]['rng'] if rank < len(ranks) else ranks[0]['rng']
    partial = [r['meters'] for r in ranks if r['meters'] is not None]
    if rank != 0 or not partial:
        return rng, None
    return rng, {key: sum(m[key] for m in partial) for key in partial[0]}


# ---- positions in a run

def resume_position(state: dict) -> tuple[int, int]:
    """Where training continues from a checkpoint: (epoch, updates of it already done); the next epoch when the
    checkpoint's epoch is complete. A checkpoint without ``epoch_steps`` (written before 0.3) recorded this position
    itself."""
    epoch, step = int(state['epoch']), int(state['step'])
    if 'epoch_steps' not in state:
        return epoch, step
    return (epoch + 1, 0) if step >= int(state['epoch_steps']) else (epoch, step)


def position_text(state: dict) -> str:
    """Where a checkpoint is in its run, for messages: 'end of epoch 3', or 'epoch 3 step 40/100' within it."""
    epoch, step = resume_position(state)
    if step == 0:
        return f'end of epoch {epoch - 1}'
    return f'epoch {epoch} step {step}' + (f'/{state["epoch_steps"]}' if 'epoch_steps' in state else '')


# ---- atomic writes

def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    return path.with_name(f'.{path.name}.tmp')


# The one seam for fault injection: when set (by tests/faulty_writes.py), called as the bytes of a file of the run are
# about to be written, with the path, the open temporary file and the data; for a file that is a hard link, once the
# link is made and before it is renamed into place, with None for both.
before_write: Callable[[Path, BinaryIO | None, memoryview | None], None] | None = None


def _failure(path: Path, error: BaseException) -> CheckpointWriteError:
    cause = error.strerror if isinstance(error, OSError) and error.strerror else ' '.join(str(error).split())
    kept = f'the previous {path.name} is intact' if path.exists() else f'no earlier {path.name} exists'
    return CheckpointWriteError(f'could not write {path}: {cause}; {kept}')


def _write_temp(path: Path, data: memoryview) -> Path:
    """Write ``data`` to ``path``'s temporary file and fsync it; returns the temporary path."""
    tmp = temp_path(path)
    with open(tmp, 'wb') as f:
        if before_write is not None:
            before_write(path, f, data)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _link_temp(source: Path, path: Path) -> Path:
    """``path``'s temporary file as a hard link to ``source`` (no bytes written), or a full copy of it where the
    filesystem has no hard links (some network and FUSE filesystems)."""
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        with open(source, 'rb') as f:
            return _write_temp(path, memoryview(f.read()))
    if before_write is not None:
        before_write(path, None, None)
    return tmp


def write_files(data: bytes | memoryview, paths: list[Path]) -> None:
    """Write ``data`` once and put it in place at every path of ``paths``, in order, each by an atomic rename: the
    bytes go to the last path's temporary file (fsync), the others are hard links to it. Any failure (full disk,
    quota, file size limit, I/O error, an interrupt) removes the temporary files and raises CheckpointWriteError
    naming the path and the cause; every path not yet renamed keeps its previous version."""
    paths = [Path(p) for p in paths]
    data, current, temps = memoryview(data), paths[-1], []
    try:
        temps.append(_write_temp(paths[-1], data))
        for current in paths[:-1]:
            os.replace(_link_temp(temps[0], current), current)
        current = paths[-1]
        os.replace(temps[0], current)
        _fsync_dir(current.parent)
    except BaseException as error:
        for path in paths:
            temp_path(path).unlink(missing_ok=True)
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: clean up, then let it through
            raise
        raise _failure(current, error) from None


def write_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (write_files with one path)."""
    write_files(data, [Path(path)])


def save_checkpoint(state: dict, paths: list[str | os.PathLike] | str | os.PathLike) -> None:
    """Serialise once in memory, then write_files to every path. Serialising first matters on a full disk: torch.save
    writing to a file reports a failed write as RuntimeError('unexpected pos ...'), losing the cause that a plain
    write reports."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_files(buffer.getbuffer(), [paths] if isinstance(paths, (str, os.PathLike)) else list(paths))


# ---- reading

def _reason(error: Exception) -> str:
    text = ' '.join(str(error).split())
    unsafe = re.search(r'[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)', text)  # torch words it two ways
    if unsafe:
        return (f'it holds a Python object ({unsafe.group(1)}) that a checkpoint of this suite never holds, so it '
                f'was not loaded (it could run code)')
    return text[:200]


def _load(path: Path, mmap: bool = False, allowed: tuple = ()):
    if not path.is_file():
        raise UsageError(f'checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as error:  # truncated zip, a pickle with code in it, not a torch file: all "not usable"
        raise UsageError(f'cannot read checkpoint {path}: {_reason(error)}') from None


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint of this suite on the CPU with ``weights_only=True``; a missing, truncated or foreign file is a
    UsageError naming it. ``mmap`` maps the tensors instead of reading them (cheap look at the position of a large
    file)."""
    path = Path(path)
    state = _load(path, mmap)
    if not isinstance(state, dict) or 'state_dict' not in state or 'args' not in state:
        raise UsageError(f'{path} is not a checkpoint written by train.py (no state_dict and args)')
    return state


def load_weights(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict, dict]:
    """Model weights from any checkpoint an ImageNet user meets: this suite's, timm train.py's (model_best.pth.tar,
    checkpoint-<N>.pth.tar; the published code's are of this kind, from a 2021 timm) or a bare state dict. Read with
    ``weights_only=True``: timm's train.py pickles its arguments as an argparse.Namespace, which is plain data and
    allowed here; anything that could run code is still refused. Returns (state_dict without DDP's 'module.'
    prefix, info), info holding what the file records of 'arch', 'args' (a dict), 'epoch', 'step', 'epoch_steps' and
    'classes'."""
    from timm.models import clean_state_dict
    path = Path(path)
    state = _load(path, allowed=(argparse.Namespace,))
    if not isinstance(state, dict):
        raise UsageError(f'{path} holds no state dict (a {type(state).__name__})')
    key = 'state_dict_ema' if use_ema and state.get('state_dict_ema') is not None else (
        'state_dict' if 'state_dict' in state else 'model' if isinstance(state.get('model'), dict) else None)
    weights = state[key] if key else state
    if not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UsageError(f'{path} holds no model weights (no state_dict, and not a bare state dict)')
    args = state.get('args') if key else None
    info = {'arch': state.get('arch') if key else None, 'epoch': state.get('epoch') if key else None,
            'step': state.get('step') if key else None, 'epoch_steps': state.get('epoch_steps') if key else None,
            'classes': state.get('classes'),
            'args': vars(args) if isinstance(args, argparse.Namespace) else args}
    return clean_state_dict(weights), info


RESUME_POINTS = ('recovery.pth', 'last.pth')


def checkpoint_files(run_dir: Path) -> list[Path]:
    names = [run_dir / name for name in (*RESUME_POINTS, 'best.pth')]
    return [p for p in names + sorted(run_dir.glob('epoch_*.pth')) if p.is_file()]


def _readable_positions(paths: list[Path], problems: list[str]) -> list[tuple[tuple[int, int], Path]]:
    """The resume position of each path that loads and is complete; the others are added to ``problems``."""
    found = []
    for path in paths:
        try:
            state = load_checkpoint(path, mmap=True)
        except UsageError as error:
            problems.append(str(error))
            log.warning('skipping %s', error)
            continue
        missing = [key for key in REQUIRED_KEYS if key not in state]
        if missing:
            problems.append(f'{path}: incomplete (no {", ".join(missing)})')
            log.warning('skipping %s: incomplete (no %s)', path, ', '.join(missing))
            continue
        found.append((resume_position(state), path))
    return found


def find_resume_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The checkpoint to continue ``run_dir`` from: of recovery.pth and last.pth, the one furthest along the run
    (the largest resume position, not the newest file). best.pth and epoch_<N>.pth are written before last.pth at an
    epoch end, so they are resume points only when neither of the two is readable: resuming from one of them while
    last.pth is stale would skip the epoch-end writes that a crash interrupted. Damaged files are skipped with a
    warning. None when the directory holds no checkpoint at all; a UsageError when it holds checkpoints but none is
    readable (a new run there would overwrite what is left of the old one)."""
    run_dir = Path(run_dir)
    files, problems = checkpoint_files(run_dir), []
    found = _readable_positions([p for p in files if p.name in RESUME_POINTS], problems)
    if not found:
        found = _readable_positions([p for p in files if p.name not in RESUME_POINTS], problems)
    if not found:
        if problems:
            raise UsageError(f'{run_dir} holds checkpoints but none is readable ({"; ".join(problems)[:300]}); '
                             f'move them away, or pass --overwrite to start the run again')
        return None
    _, path = max(found, key=lambda item: item[0])
    return path, load_checkpoint(path)


# ---- run directories

def existing_run_files(run_dir: Path) -> list[str]:
    """What makes a directory hold a run: its summary and checkpoints. A run that failed before writing any of them
    (config.yaml alone) left nothing worth keeping."""
    summary = ['summary.csv'] if (run_dir / 'summary.csv').exists() else []
    return summary + [p.name for p in checkpoint_files(run_dir)]


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse, before anything is written, an --output that is a file, or that holds another run which this one
    would neither resume nor be allowed to replace."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f'--output {run_dir} is a file, not a directory')
    if run_dir.is_dir() and not resume and not overwrite:
        found = existing_run_files(run_dir)
        if found:
            raise UsageError(f'{run_dir} already holds a run ({", ".join(found[:4])}); pass --resume auto to '
                             f'continue it, --overwrite to replace it, or another --output')


def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool, lock: RunLock) -> None:
    """Create the run directory and check that it is writable. A directory that this job did not find when it
    started is locked now, and must still hold no run: another job may have begun one there meanwhile.
    ``--overwrite`` (without --resume) removes the old run's files first, so that a crash of the new run can never
    resume the old one. Temporary files that a killed process left behind are removed (under the lock: none of them
    can be another job's)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / '.write-test.tmp'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as error:
        raise UsageError(f'cannot write to --output {run_dir}: {error.strerror or error}') from None
    if lock.fd is None:
        lock.acquire()
        if existing_run_files(run_dir) and not overwrite:
            raise UsageError(f'{run_dir}: another job began a run there while this one was starting; continue it '
                             f'with --resume auto, or choose another --output')
    if overwrite and not resume:
        for name in (*existing_run_files(run_dir), 'config.yaml'):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / 'tb', ignore_errors=True)
    for orphan in run_dir.glob('.*.tmp'):
        orphan.unlink(missing_ok=True)
