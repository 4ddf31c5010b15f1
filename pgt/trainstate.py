"""What a run carries from step to step besides its modules: the position (epoch, step), the best epoch so far, the
newest checkpoint written (named in error messages), and the writing and restoring of all of it.

A checkpoint holds everything needed to continue the same trajectory (pgt.checkpoint): model, optimizer, gradient
scaler, skip streak, the best epoch, and each rank's RNG states and partial-epoch meters. It is gathered on every rank
and written by rank 0 only, after a check that its weights and buffers are finite, so that a diverged run never writes
over a good checkpoint; a failure there stops every rank (pgt.distributed.run_on_main).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import (CHECKPOINT_VERSION, position_text, rank_state, resume_position, rng_state, save_checkpoint,
                         set_rng_state)
from .distributed import all_gather_object, run_on_main
from .engine import EpochMeters, SkipStreak
from .errors import TrainingDiverged
from .models import load_model_state
from .optim import load_optimizer_state

log = logging.getLogger(__name__)


class TrainState:
    def __init__(self, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, streak: SkipStreak, env, run_config: dict, classes: list[str],
                 epoch_steps: int, data: dict):
        self.run_dir, self.model, self.optimizer, self.scaler, self.streak = run_dir, model, optimizer, scaler, streak
        self.env, self.run_config, self.classes, self.epoch_steps = env, run_config, classes, epoch_steps
        self.data = data  # the training images it trains on: {'train_images': N, 'train_digest': sha256 or None}
        self.best = {'top1': -1.0, 'epoch': -1}
        self.newest: str | None = None  # 'PATH (end of epoch E)' of the newest checkpoint, for messages

    def restore(self, path: Path, state: dict) -> tuple[int, int, EpochMeters | None]:
        """Load a checkpoint of this run; returns where to continue: (epoch, step, this rank's meters of a partial
        epoch or None)."""
        load_model_state(self.model, state['state_dict'], path, self.run_config['model'],
                         self.run_config['num_classes'])
        load_optimizer_state(self.optimizer, state['optimizer'])
        if scaler_kind(state['args']) == scaler_kind(self.run_config):
            self.scaler.load_state_dict(state['scaler'])
        else:  # --allow-config-change across precisions: a bfloat16 scaler (scale 1) would underflow float16
            log.warning('%s was trained with a %s gradient scaler; this run uses a %s one, which starts afresh',
                        path, scaler_kind(state['args']), scaler_kind(self.run_config))
        self.streak.load_state_dict(state['skip_streak'])
        self.best = dict(state['best'])
        epoch, step = resume_position(state)
        rng, meters = rank_state(state, self.env.rank, self.env.world_size)
        set_rng_state(rng)
        self.newest = f'{path} ({position_text(state)})'
        return epoch, step, EpochMeters.from_state(meters, self.env.device) if meters and step else None

    def checkpoint(self, epoch: int, step: int, meters: EpochMeters | None) -> dict:
        """Everything to continue after update ``step`` of epoch ``epoch`` (all of its updates at an epoch end),
        every rank's RNG state and partial-epoch meters included (a collective: every rank calls it)."""
        ranks = all_gather_object({'rng': rng_state(), 'meters': meters.state_dict() if meters is not None else None})
        return {'state_dict': self.model.state_dict(), 'arch': self.run_config['model'],
                'optimizer': self.optimizer.state_dict(), 'scaler': self.scaler.state_dict(), 'epoch': epoch,
                'step': step, 'epoch_steps': self.epoch_steps, 'version': CHECKPOINT_VERSION,
                'best': dict(self.best), 'skip_streak': self.streak.state_dict(), 'ranks': ranks, 'data': self.data,
                'world_size': self.env.world_size, 'args': self.run_config,
                'num_classes': self.run_config['num_classes'], 'classes': self.classes}

    def write(self, state: dict, names: list[str]) -> None:
        """Write ``state`` once under each of ``names``, in order (pgt.checkpoint.write_files), on rank 0, if its
        weights and buffers are finite; any failure stops every rank."""
        def check_and_write():
            require_finite(state['state_dict'], state['epoch'], state['step'], self.newest_line())
            save_checkpoint(state, [self.run_dir / name for name in names])

        run_on_main(check_and_write, self.env.is_main)
        self.newest = f'{self.run_dir / names[-1]} ({position_text(state)})'

    def save_recovery(self, epoch: int, step: int, meters: EpochMeters) -> None:
        self.write(self.checkpoint(epoch, step, meters), ['recovery.pth'])

    def save_epoch_end(self, epoch: int, eval_top1: float, checkpoint_interval: int) -> None:
        """The epoch-end files, in the order that makes a crash between them resumable (pgt.checkpoint): best.pth if
        this epoch is the best so far, epoch_<epoch>.pth after every ``checkpoint_interval`` epochs, last.pth."""
        names = []
        if eval_top1 > self.best['top1']:
            self.best = {'top1': eval_top1, 'epoch': epoch}
            names.append('best.pth')
        if checkpoint_interval and (epoch + 1) % checkpoint_interval == 0:
            names.append(f'epoch_{epoch}.pth')
        self.write(self.checkpoint(epoch, self.epoch_steps, None), names + ['last.pth'])

    def newest_line(self) -> str:
        return f'the newest checkpoint is {self.newest}' if self.newest else 'no checkpoint had been written'


def scaler_kind(config: dict) -> str:
    """'float16' (dynamic loss scaling) or 'fixed' (scale 1: bfloat16 and float32), as pgt.engine.make_scaler makes
    them for a run's configuration."""
    return 'float16' if config.get('amp') and config.get('amp_dtype') == 'float16' else 'fixed'


def require_finite(model_state: dict, epoch: int, step: int, newest_line: str) -> None:
    """Refuse to write non-finite weights or buffers. One reduction over all floating tensors (the largest absolute
    value, inf or NaN when any entry is); the names are looked up only when it fails."""
    floats = [t for t in model_state.values() if t.is_floating_point()]
    largest = torch.nn.utils.get_total_norm(floats, norm_type=float('inf'))
    if not torch.isfinite(largest):
        bad = [name for name, t in model_state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        raise TrainingDiverged(f'non-finite values in {", ".join(bad[:3])} at epoch {epoch} step {step}, so no '
                               f'checkpoint was written; {newest_line}')
