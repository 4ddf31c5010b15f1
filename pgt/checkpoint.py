"""Checkpoints that survive crashes: atomic writes, and ``--resume auto`` that skips damaged files.

Files in a run directory: ``last.pth`` (end of the latest epoch), ``best.pth`` (best eval top-1), ``epoch_<N>.pth``
(every --checkpoint-interval epochs) and ``recovery.pth`` (every --recovery-interval steps within an epoch, and on a
preemption signal). Each holds everything needed to continue the same trajectory: model, optimizer, gradient
scaler, the position (epoch, step within it), the metric accumulators of a partial epoch, and the RNG states. The
learning rate is a function of the position (train.py steps the scheduler to it), so no scheduler state is stored.
"""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

log = logging.getLogger(__name__)
CHECKPOINT_NAMES = ('recovery.pth', 'last.pth')
REQUIRED_KEYS = ('model', 'optimizer', 'epoch', 'step')


def rng_state() -> dict:
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(), 'numpy': np.random.get_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write to a temporary file, flush and fsync it, then rename over ``path``: a crash or a full disk at any
    moment leaves either the old file or the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        kept = 'the previous checkpoint is intact' if path.exists() else 'no earlier checkpoint of that name exists'
        raise UsageError(f'could not write checkpoint {path}: {error.strerror or error}; {kept}') from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint on the CPU; a missing, truncated or foreign file is a UsageError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'checkpoint not found: {path}')
    try:
        # weights_only=False: the file holds RNG states and the run's options, written by this project itself.
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as error:  # truncated zip, unpickling errors: all mean "not a usable checkpoint"
        raise UsageError(f'cannot read checkpoint {path}: {" ".join(str(error).split())[:200]}') from None
    if not isinstance(state, dict) or 'model' not in state:
        raise UsageError(f'{path} is not a checkpoint written by train.py (no model state)')
    return state


def find_resume_checkpoint(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``run_dir`` that loads and is complete; damaged ones are skipped with a warning."""
    run_dir = Path(run_dir)
    candidates = [run_dir / name for name in CHECKPOINT_NAMES] + list(run_dir.glob('epoch_*.pth'))
    candidates = sorted((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except UsageError as error:
            log.warning('skipping %s', error)
            continue
        if all(key in state for key in REQUIRED_KEYS):
            return path, state
        log.warning('skipping %s: incomplete (no %s)', path, [k for k in REQUIRED_KEYS if k not in state])
    return None


RUN_MARKERS = ('summary.csv', 'config.yaml', 'last.pth', 'best.pth', 'recovery.pth')


def prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A new run never writes into a directory that holds another run, unless it resumes it or --overwrite is given
    (then the old summary.csv is replaced; checkpoints are replaced as the new run writes its own)."""
    found = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if found and not resume and not overwrite:
        raise UsageError(f'{run_dir} already holds a run ({", ".join(found)}); pass --resume auto to continue it, '
                         f'--overwrite to replace it, or another --output')
    run_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        (run_dir / 'summary.csv').unlink(missing_ok=True)
