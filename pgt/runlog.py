"""What a run reports: a progress bar with ETA, TensorBoard scalars under <run>/tb, and summary.csv (timm's
columns: epoch, train_*, eval_*, lr), all from rank 0 only.

summary.csv is rewritten whole and atomically at every epoch end (timm's ``update_summary`` appends, which a crash
can leave with half a row), and on every start it keeps only the epochs before the one the run continues from: an
epoch that is repeated after a crash is logged once. TensorBoard is a convenience: if its files cannot be written
(a full disk), the run says so once and goes on; the checkpoints and summary.csv are what must not fail silently.
"""
from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .checkpoint import write_atomic

log = logging.getLogger('pgt')


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')


class RunLog:
    def __init__(self, run_dir: Path | None, enabled: bool, start_epoch: int = 0):
        self.enabled = enabled and run_dir is not None
        self.summary = run_dir / 'summary.csv' if run_dir else None
        self.rows = []
        self.tb = None
        if self.enabled:
            self.rows = [row for row in read_summary(run_dir) if _epoch_of(row) < start_epoch]
            write_summary(self.summary, self.rows)
            try:
                self.tb = SummaryWriter(str(run_dir / 'tb'))
            except Exception as error:
                self._tensorboard_failed(error)
        self.bar = None

    def _tensorboard(self, method: str, *args) -> None:
        """Call a SummaryWriter method, if TensorBoard logging is still on."""
        if self.tb is not None:
            try:
                getattr(self.tb, method)(*args)
            except Exception as error:  # the event writer's thread re-raises an OSError as a bare Exception
                self._tensorboard_failed(error)

    def _tensorboard_failed(self, error: Exception) -> None:
        log.warning('TensorBoard logging stopped: %s', ' '.join(str(error).split())[:200])
        self.tb = None

    def start_epoch(self, epoch: int, num_epochs: int, steps: int, done: int = 0):
        if self.enabled:
            self.bar = tqdm(total=steps, initial=done, desc=f'epoch {epoch + 1}/{num_epochs}', unit='step',
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0, leave=False, disable=None)
            self.epoch = epoch

    def step(self, global_step: int, epoch_step: int, scalars: dict | None = None):
        if not self.enabled:
            return
        self.bar.update(1)
        if scalars:
            self.bar.set_postfix({k: f'{v:.4g}' for k, v in scalars.items()}, refresh=False)
            if self.bar.disable:  # no terminal (a batch job's log file): a line per logging interval instead
                log.info('epoch %d step %d: %s', self.epoch, epoch_step,
                         ' '.join(f'{k} {v:.4g}' for k, v in scalars.items()))
            for name, value in scalars.items():
                self.scalar(f'train_step/{name}', value, global_step)

    def scalar(self, tag: str, value: float, step: int):
        self._tensorboard('add_scalar', tag, value, step)

    def histogram(self, tag: str, values, step: int):
        self._tensorboard('add_histogram', tag, values, step)

    def end_epoch(self, epoch: int, train: dict, evaluation: dict, lr: float):
        """Log the epoch; summary.csv gets timm's row (epoch, train_*, eval_*, lr)."""
        if not self.enabled:
            return
        self.bar.close()
        for name, value in train.items():
            self.scalar(f'train/{name}', value, epoch)
        for name, value in evaluation.items():
            self.scalar(f'eval/{name}', value, epoch)
        self.scalar('train/lr', lr, epoch)
        self._tensorboard('flush')
        row = {'epoch': epoch, **{f'train_{k}': v for k, v in train.items()},
               **{f'eval_{k}': v for k, v in evaluation.items()}, 'lr': lr}
        self.rows.append(row)  # the rows of this epoch and later were dropped when the run started
        write_summary(self.summary, self.rows)
        log.info('epoch %d: train loss %.4f top-1 %.2f | eval loss %.4f top-1 %.2f top-5 %.2f | lr %.4g | %.0f img/s',
                 epoch, train['loss'], train['top1'], evaluation['loss'], evaluation['top1'], evaluation['top5'], lr,
                 train['img_per_sec'])

    def close(self):
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self._tensorboard('close')


def _epoch_of(row: dict) -> float:
    """A row's epoch; a damaged row (no number) sorts after every epoch, so that the next rewrite drops it."""
    try:
        return int(row['epoch'])
    except (KeyError, TypeError, ValueError):
        return float('inf')


def write_summary(path: Path, rows: list[dict]) -> None:
    """Write the rows as one CSV (header: the columns of all rows, in order of appearance), atomically. No rows, no
    file: a run that has finished no epoch has no summary (and its directory does not count as holding a run)."""
    if not rows:
        path.unlink(missing_ok=True)
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue().encode())


def read_summary(run_dir: Path) -> list[dict]:
    """The rows of a run's summary.csv (none if it has not written one yet)."""
    path = Path(run_dir) / 'summary.csv'
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))
