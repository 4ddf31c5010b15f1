"""What a run reports: a progress bar with ETA, TensorBoard scalars under <run>/tb, and summary.csv (timm's
columns: epoch, train_*, eval_*, lr), all from rank 0 only."""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

from timm.utils import update_summary
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

log = logging.getLogger('pgt')


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')


class RunLog:
    def __init__(self, run_dir: Path | None, enabled: bool, start_epoch: int = 0):
        self.enabled = enabled and run_dir is not None
        self.summary = run_dir / 'summary.csv' if run_dir else None
        self.tb = SummaryWriter(str(run_dir / 'tb')) if self.enabled else None
        self.write_header = True
        if self.enabled and start_epoch > 0 and self.summary.exists():
            self.write_header = not trim_summary(self.summary, start_epoch)
        self.bar = None

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
                self.tb.add_scalar(f'train_step/{name}', value, global_step)

    def scalar(self, tag: str, value: float, step: int):
        if self.enabled:
            self.tb.add_scalar(tag, value, step)

    def histogram(self, tag: str, values, step: int):
        if self.enabled:
            self.tb.add_histogram(tag, values, step)

    def end_epoch(self, epoch: int, train: dict, evaluation: dict, lr: float):
        if not self.enabled:
            return
        self.bar.close()
        for name, value in train.items():
            self.tb.add_scalar(f'train/{name}', value, epoch)
        for name, value in evaluation.items():
            self.tb.add_scalar(f'eval/{name}', value, epoch)
        self.tb.add_scalar('train/lr', lr, epoch)
        self.tb.flush()
        update_summary(epoch, train, evaluation, str(self.summary), lr=lr, write_header=self.write_header)
        self.write_header = False
        log.info('epoch %d: train loss %.4f top-1 %.2f | eval loss %.4f top-1 %.2f top-5 %.2f | lr %.4g | %.0f img/s',
                 epoch, train['loss'], train['top1'], evaluation['loss'], evaluation['top1'], evaluation['top5'], lr,
                 train['img_per_sec'])

    def close(self):
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
            self.tb.close()


def read_summary(run_dir: Path) -> list[dict]:
    """The rows of a run's summary.csv (none if it has not written one yet)."""
    path = Path(run_dir) / 'summary.csv'
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def trim_summary(path: Path, start_epoch: int) -> bool:
    """Keep the rows of epochs before ``start_epoch``: a run that crashed after writing a row but before its
    checkpoint repeats that epoch, and must not log it twice. Returns whether a header remains."""
    rows = read_summary(path.parent)
    if not rows:
        return False
    kept = [row for row in rows if int(row['epoch']) < start_epoch]
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return True
