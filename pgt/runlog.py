"""What a run reports, from rank 0: interval lines (step/total, loss, images/s, the share of time spent waiting for
data, ETA) on stderr and in <run>/train.log, a progress bar on a terminal, TensorBoard scalars and HParams under
<run>/tb, and summary.csv (timm's columns: epoch, train_*, eval_*, lr).

summary.csv is rewritten whole and atomically at every epoch end (timm's ``update_summary`` appends, which a crash
can leave with half a row), and on every start it keeps only the epochs before the one the run continues from: an
epoch that is repeated after a crash is logged once. TensorBoard is a convenience: if its files cannot be written
(a full disk), the run says so once and goes on; the checkpoints and summary.csv are what must not fail silently.
train.log is appended to by every job of the run; lines logged before the run directory exists (the configuration,
the resume point) are kept in memory and written first.
"""
from __future__ import annotations

import csv
import datetime
import io
import logging
import logging.handlers
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .checkpoint import write_atomic

log = logging.getLogger('pgt')
_FORMAT = logging.Formatter('%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
_handlers: list[logging.Handler] = []  # installed by setup_logging; replaced when it runs again in one process


class _NotQuiet(logging.Filter):
    """Lets through all but the interval lines marked ``quiet``: those the progress bar already shows on stderr."""

    def filter(self, record):
        return not getattr(record, 'quiet', False)


def setup_logging(is_main: bool) -> None:
    """The 'pgt' logger: INFO on rank 0 (WARNING elsewhere) to stderr, and a buffer of the records that train.log will
    start with once RunLog opens it."""
    for handler in _handlers:
        log.removeHandler(handler)
        handler.close()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(_FORMAT)
    stderr.addFilter(_NotQuiet())
    early = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    _handlers[:] = [stderr, early] if is_main else [stderr]
    for handler in _handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO if is_main else logging.WARNING)


def _open_train_log(path: Path) -> None:
    """Send the 'pgt' logger to ``path`` too (appending), starting with what was logged before it existed."""
    handler = logging.FileHandler(path, encoding='utf-8')
    handler.setFormatter(_FORMAT)
    for early in [h for h in _handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        early.setTarget(handler)
        early.flush()
        log.removeHandler(early)
        _handlers.remove(early)
    log.addHandler(handler)
    _handlers.append(handler)


def epoch_label(epoch: int, num_epochs: int) -> str:
    """'epoch 3/5': epoch 3 of epochs 0-5. Epochs count from 0 everywhere, as in timm's summary.csv: log lines,
    summary.csv, checkpoints (their 'epoch' and epoch_<N>.pth), validate.py and the report's figures."""
    return f'epoch {epoch}/{num_epochs - 1}'


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class RunLog:
    def __init__(self, run_dir: Path | None, enabled: bool, start_epoch: int = 0, hparams: dict | None = None):
        self.enabled = enabled and run_dir is not None
        self.summary = run_dir / 'summary.csv' if run_dir else None
        self.rows, self.tb, self.bar = [], None, None
        self.hparams = hparams
        if self.enabled:
            _open_train_log(run_dir / 'train.log')
            self.rows = [row for row in read_summary(run_dir) if _epoch_of(row) < start_epoch]
            write_summary(self.summary, self.rows)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / 'tb'))
            except Exception as error:
                self._tensorboard_failed(error)
            if hparams:
                self._write_hparams_session()

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

    def _write_hparams_session(self) -> None:
        """TensorBoard's HParams tab: the run's configuration, with the metrics that end_epoch writes under
        ``hparams/`` (final and best eval top-1, final train top-1)."""
        from torch.utils.tensorboard.summary import hparams
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.hparams.items()}
        metrics = {f'hparams/{name}': 0.0 for name in HPARAM_METRICS}
        if self.tb is not None:
            try:
                for summary in hparams(values, metrics):
                    self.tb.file_writer.add_summary(summary)
            except Exception as error:
                self._tensorboard_failed(error)

    def start_epoch(self, epoch: int, num_epochs: int, steps: int, done: int = 0):
        if self.enabled:
            self.bar = tqdm(total=steps, initial=done, desc=epoch_label(epoch, num_epochs), unit='step',
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0, leave=False, disable=None)
            self.epoch, self.num_epochs, self.steps = epoch, num_epochs, steps
            self.interval = {'time': time.perf_counter(), 'step': done, 'images': 0, 'data': 0.0}

    def step(self, global_step: int, event, scalars: dict | None = None):
        """After every update (``event`` a pgt.engine.StepEvent); ``scalars`` at logging intervals."""
        if not self.enabled:
            return
        self.bar.update(1)
        self.interval['images'] += event.images
        if not scalars:
            return
        self.bar.set_postfix({k: f'{v:.4g}' for k, v in scalars.items()}, refresh=False)
        log.info(self._interval_line(event, scalars), extra={'quiet': not self.bar.disable})
        for name, value in scalars.items():
            self.scalar(f'train_step/{name}', value, global_step)

    def _interval_line(self, event, scalars: dict) -> str:
        """'epoch E/L step S/T: loss .. | N img/s, data P% | eta H:MM:SS (run H:MM:SS)', as of this interval."""
        now, interval = time.perf_counter(), self.interval
        seconds = max(now - interval['time'], 1e-9)
        per_step = seconds / max(event.step - interval['step'], 1)
        rate, waiting = interval['images'] / seconds, (event.data_seconds - interval['data']) / seconds
        left = self.steps - event.step
        run_left = left + (self.num_epochs - self.epoch - 1) * self.steps
        self.interval = {'time': now, 'step': event.step, 'images': 0, 'data': event.data_seconds}
        values = ' '.join(f'{k} {v:.4g}' for k, v in scalars.items())
        return (f'{epoch_label(self.epoch, self.num_epochs)} step {event.step}/{self.steps}: {values} | '
                f'{rate:.0f} img/s, data {100 * min(waiting, 1.0):.0f}% | eta {_duration(left * per_step)} '
                f'(run {_duration(run_left * per_step)})')

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
        row = {'epoch': epoch, **{f'train_{k}': v for k, v in train.items()},
               **{f'eval_{k}': v for k, v in evaluation.items()}, 'lr': lr}
        self.rows.append(row)  # the rows of this epoch and later were dropped when the run started
        if self.hparams:
            best = max(float(r['eval_top1']) for r in self.rows)
            for name, value in zip(HPARAM_METRICS, (evaluation['top1'], best, train['top1'])):
                self.scalar(f'hparams/{name}', value, epoch)
        self._tensorboard('flush')
        write_summary(self.summary, self.rows)
        log.info('%s: train loss %.4f top-1 %.2f | eval loss %.4f top-1 %.2f top-5 %.2f | lr %.4g | %.0f img/s',
                 epoch_label(epoch, self.num_epochs), train['loss'], train['top1'], evaluation['loss'],
                 evaluation['top1'], evaluation['top5'], lr, train['img_per_sec'])

    def close(self):
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self._tensorboard('close')


HPARAM_METRICS = ('eval_top1_final', 'eval_top1_best', 'train_top1_final')


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
