"""Train an ImageNet classifier with timm, optionally with the PowerGrad Transform (PGT).

    python train.py --config configs/smoke.yaml --data-dir DIR --output RUN        (from a clone; or pgt-train)
    torchrun --nproc-per-node 4 train.py -c configs/paper/resnet50-cosine-pgt.yaml --data-dir /imagenet

Reads top to bottom: configuration, data, model, optimizer and schedule, resume, then the epoch loop. Everything that
can refuse the run (options, data, model, checkpoint) is checked before the run directory is created. The pieces
live in pgt/; this module only wires them together.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from timm.data import Mixup
from timm.layers import convert_sync_batchnorm

from . import __version__
from .checkpoint import check_run_dir, find_resume_checkpoint, load_checkpoint, prepare_run_dir, resume_position
from .config import (config_changes, finalize_args, ignored_options_warning, parse_config, resolve_device_settings,
                     resolved_config, save_config)
from .diagnostics import Diagnostics, series_layers
from .distributed import DistEnv, all_reduce_sum, barrier, broadcast_object, init_distributed, run_on_main, shutdown
from .engine import (AMP_DTYPES, BufferGuard, EpochMeters, SkipStreak, StepEvent, TrainingParts, evaluate,
                     make_scaler, to_device, train_one_epoch)
from .errors import Preempted, TrainingDiverged, UsageError, run_cli
from .folders import check_same_classes
from .launch import final_failure, report_exit
from .loaders import Loaders, build_loaders, save_indexes
from .models import create_model
from .optim import build_optimizer, build_scheduler, clip_parameters, set_epoch_rate, set_update_rate
from .preemption import PreemptionFlag
from .published_hook import PublishedHookCrossEntropy
from .runlock import RunLock
from .runlog import RunLog, setup_logging
from .trainstate import TrainState
from .transform import PowerGradCrossEntropy

log = logging.getLogger('pgt')
INDEX_DIR = 'index'  # <run>/index/<split>.npz: the scans of the data tree that restarts read (pgt.folders.ImageIndex)


def main(argv) -> int:
    preemption = PreemptionFlag().install()  # until training starts, a signal stops the process at once (exit 75)

    # ---- configuration: defaults < recipe < command line, all checked before anything is written
    args = parse_config(argv)
    finalize_args(args, world_size=int(os.environ.get('WORLD_SIZE', 1)))
    if args.dry_run:
        print(yaml.safe_dump(resolved_config(args), sort_keys=False), end='')
        return 0
    given = (Path(args.resume), load_checkpoint(args.resume)) if args.resume not in (None, 'auto') else None
    if args.deterministic:  # cuBLAS reads its workspace setting when the CUDA context is made, in init_distributed
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    env = init_distributed()
    setup_logging(env.is_main)
    log.info('pgt %s (torch %s, timm %s): %s, global batch %d over %d rank(s) on %s; reading %s', __version__,
             torch.__version__, timm.__version__, args.model, args.batch_size * args.grad_accum_steps * env.world_size,
             env.world_size, env.device.type, args.data_dir or 'synthetic data')
    if ignored_options_warning(args):
        log.warning(ignored_options_warning(args))
    resolve_device_settings(args, env.device)
    preemption.watch_launcher()
    run_dir, lock = claim_run_dir(args, given, env)
    try:
        train(args, env, run_dir, lock, given, preemption)
    finally:
        lock.release()
    shutdown()
    return 0


def train(args, env: DistEnv, run_dir: Path, lock: RunLock, given: tuple[Path, dict] | None,
          preemption: PreemptionFlag) -> None:
    """The run, once its directory is claimed: data, the checkpoint to continue from, model and optimizer, the run
    directory's files, then the epoch loop."""
    # ---- data (the indexes a restart saved, while the folders are unchanged), and the checkpoint to continue from
    loaders = build_loaders(args, env.rank, env.world_size, env.device, run_dir / INDEX_DIR)
    log.info('data: %d training and %d validation images in %d classes', loaders.train_images, loaders.val_images,
             loaders.num_classes)
    args.num_classes = args.num_classes or loaders.num_classes
    resume = given or find_auto_resume(args, run_dir)
    if resume is not None:
        check_resumable(resume, args, loaders, env.world_size)
        log.info('resuming from %s', resume[0])

    # ---- model, optimizer, schedule, and the state they continue from
    torch.manual_seed(args.seed + env.rank)
    random.seed(args.seed + env.rank)
    np.random.seed(args.seed + env.rank)
    torch.backends.cudnn.benchmark = env.device.type == 'cuda' and not args.deterministic
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = build_model(args, env)
    optimizer = build_optimizer(model, args, env.device)
    steps_per_epoch = math.ceil(len(loaders.train) / args.grad_accum_steps)  # a last, partial update included
    scheduler, num_epochs = build_scheduler(optimizer, args, steps_per_epoch)
    amp_dtype = AMP_DTYPES[args.amp_dtype] if args.amp else None
    state = TrainState(run_dir, model, optimizer, make_scaler(env.device, amp_dtype), SkipStreak.zeros(env.device),
                       env, resolved_config(args, provenance=False), loaders.classes, steps_per_epoch,
                       {'train_images': loaders.train_images, 'train_digest': loaders.train_digest})
    start_epoch, start_step, meters = state.restore(*resume) if resume else (0, 0, None)

    # ---- the run directory: created (and locked, if it is new) only now that nothing above refused the run
    run_on_main(functools.partial(prepare_run_dir, run_dir, args.resume, args.overwrite, lock), env.is_main)
    run_on_main(functools.partial(save_indexes, loaders, run_dir / INDEX_DIR), env.is_main)
    runlog = RunLog(run_dir, env.is_main, start_epoch, hparams=resolved_config(args, provenance=False))
    if env.is_main:
        save_config(args, run_dir / 'config.yaml')
    parts = training_parts(model, state, amp_dtype, args, env)
    run = Training(args, env, run_dir, loaders, parts, scheduler, state, runlog, preemption,
                   start_diagnostics(model, parts, loaders, runlog, run_dir, args, env), steps_per_epoch, num_epochs)
    # Under DDP the ranks agree on a signal every k steps: a collective per step costs more than the latency it saves.
    preemption.agree_every = min(args.signal_check_interval, args.recovery_interval or args.signal_check_interval)
    preemption.training_started()

    # ---- the epoch loop
    for epoch in range(start_epoch, num_epochs):
        resumed = epoch == start_epoch
        train_metrics = train_epoch(run, epoch, start_step if resumed else 0, meters if resumed else None)
        eval_metrics = evaluate(parts.model, loaders.val, env.device, amp_dtype, args.channels_last,
                                progress=env.is_main)
        end_epoch(run, epoch, train_metrics, eval_metrics)
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch and epoch + 1 < num_epochs:
            log.info('stopping after epoch %d as asked (--stop-after-epoch); continue with --resume auto', epoch)
            break
    runlog.close()
    if state.best['epoch'] >= 0:
        log.info('best eval top-1 %.2f at epoch %d; run directory %s', state.best['top1'], state.best['epoch'],
                 run_dir)
    barrier()


@dataclass
class Training:
    """A run once it is set up: what the epoch and step functions below work with."""
    args: argparse.Namespace
    env: DistEnv
    run_dir: Path
    loaders: Loaders
    parts: TrainingParts  # the module as trained (DDP, compiled), the loss, the optimizer and the step's settings
    scheduler: object
    state: TrainState
    runlog: RunLog
    preemption: PreemptionFlag
    diagnostics: Diagnostics | None
    steps_per_epoch: int
    num_epochs: int


# ---- set-up

def claim_run_dir(args, given: tuple[Path, dict] | None, env: DistEnv) -> tuple[Path, RunLock]:
    """--output; else the folder of the checkpoint given to --resume; else a new runs/<model>-<time>-<random>, the
    same on every rank and never the folder of another job started in the same second. A folder that holds another
    run is refused here; one that exists is locked now (rank 0), before anything in it is read or written, so that
    no other job can use it until this one ends (pgt.runlock)."""
    if args.output is None:
        fresh = f'runs/{args.model}-{time.strftime("%Y%m%d-%H%M%S")}-{secrets.token_hex(3)}'
        args.output = broadcast_object(str(given[0].parent) if given else fresh)
    run_dir = Path(args.output)
    check_run_dir(run_dir, args.resume, args.overwrite)
    lock = RunLock(run_dir)
    if run_dir.is_dir():
        run_on_main(lock.acquire, env.is_main)
    return run_dir, lock


def find_auto_resume(args, run_dir: Path) -> tuple[Path, dict] | None:
    """With --resume auto, the checkpoint of ``run_dir`` furthest along (None: a new run)."""
    if args.resume != 'auto':
        return None
    resume = find_resume_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume is None:
        log.info('no checkpoint in %s: new run', run_dir)
    return resume


def build_model(args, env: DistEnv) -> torch.nn.Module:
    """The timm model on this rank's device, in the memory format and with the batch norm the run asks for."""
    model = create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    if args.diagnostics:
        series_layers(model, args.diagnostics_layers)  # a layer the model lacks is refused before any write
    if args.sync_bn and env.distributed:
        model = convert_sync_batchnorm(model)
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def training_parts(model: torch.nn.Module, state: TrainState, amp_dtype, args, env: DistEnv) -> TrainingParts:
    """The module as trained (DDP over the ranks, torch.compile'd if asked), the loss (PGT's alpha is set per epoch
    by train_epoch), mixup, clipping and the guard that undoes a skipped update's buffer changes."""
    trained = model
    if env.distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == 'cuda' else None)
    if args.torchcompile:
        trained = torch.compile(trained, backend=args.torchcompile)
    if args.pgt_impl == 'hook':
        loss_fn = PublishedHookCrossEntropy(1.0, args.smoothing)
        if amp_dtype != torch.float16 and args.pgt_alpha not in (None, 1.0):
            log.warning('--pgt-impl hook without float16: the published hook assumes a loss scale of (per-GPU '
                        'batch)^2 = %d; this run\'s is 1, so its PGT gradients are about that many times too large',
                        args.batch_size ** 2)
    else:  # target checks read values back to the host: off the GPU hot path (CUDA asserts on bad indices)
        loss_fn = PowerGradCrossEntropy(1.0, args.smoothing, check_targets=env.device.type != 'cuda')
    mixup = None
    if args.mixup or args.cutmix:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=args.num_classes)
    return TrainingParts(trained, loss_fn, state.optimizer, state.scaler, amp_dtype, args.clip_grad, args.clip_mode,
                         clip_parameters(model, args.clip_mode), args.channels_last, mixup,
                         buffer_guard=BufferGuard(model))


def start_diagnostics(model, parts: TrainingParts, loaders: Loaders, runlog: RunLog, run_dir: Path, args,
                      env: DistEnv) -> Diagnostics | None:
    """The diagnostics of --diagnostics on rank 0, probing with the first validation batch."""
    if not (args.diagnostics and env.is_main):
        return None
    probe = to_device(*next(iter(loaders.val)), env.device, args.channels_last)
    diagnostics = Diagnostics(model, parts.loss_fn, probe, args.diagnostics_interval, run_dir, runlog,
                              args.diagnostics_mask, layers=args.diagnostics_layers)
    parts.grad_observer = diagnostics.observe_grads
    return diagnostics


# ---- an epoch

def train_epoch(run: Training, epoch: int, skip: int, meters: EpochMeters | None) -> dict:
    """Epoch ``epoch`` from update ``skip`` on (a resumed epoch: with its meters so far): the epoch's learning rate
    and transform, then the steps, each followed by AfterStep. Returns the epoch's training metrics."""
    args, dataset = run.args, run.loaders.train_dataset
    set_epoch_rate(run.scheduler, epoch, args)
    alpha = args.pgt_alpha if args.pgt_alpha is not None and epoch >= args.pgt_start_epoch else 1.0
    run.parts.loss_fn.alpha = alpha
    run.loaders.train.sampler.set_epoch(epoch, skip * args.grad_accum_steps)
    if run.loaders.train_sizes is not None:
        log.info('epoch %d trains at %s', epoch, run.loaders.train_sizes.describe(epoch))
    run.runlog.start_epoch(epoch, run.num_epochs, run.steps_per_epoch, skip)
    if dataset is not None:
        dataset.reset_unreadable()
    metrics = train_one_epoch(run.parts, run.loaders.train, run.env.device, args.grad_accum_steps, skip, meters,
                              run.state.streak, AfterStep(run, epoch))
    if metrics['skipped_steps'] >= run.steps_per_epoch:
        raise TrainingDiverged(f'every step of epoch {epoch} had a non-finite loss or gradient, so the model did '
                               f'not change; {run.state.newest_line()}')
    if dataset is not None:
        unreadable = torch.tensor([dataset.unreadable_count()], device=run.env.device)
        metrics['unreadable'] = int(all_reduce_sum(unreadable).item())
    return metrics


class AfterStep:
    """What follows each update of an epoch (train_one_epoch's ``on_step``): the learning rate per update
    (--sched-on-updates), logging and the check for diverging steps at intervals, diagnostics, and the recovery
    checkpoint, written every --recovery-interval steps and when the ranks agree on a preemption signal."""

    def __init__(self, run: Training, epoch: int):
        self.run, self.epoch = run, epoch
        self.reported_skips = 0

    def __call__(self, event: StepEvent) -> None:
        run, args = self.run, self.run.args
        global_step = self.epoch * run.steps_per_epoch + event.step
        set_update_rate(run.scheduler, global_step, args)
        scalars = None
        if event.step % args.log_interval == 0 or event.step == event.steps_in_epoch:
            scalars = {'loss': event.loss.item(), 'lr': run.parts.optimizer.param_groups[0]['lr'],
                       'grad_norm': event.grad_norm.item()}
            self.check_skips(event)
        run.runlog.step(global_step, event, scalars)
        if run.diagnostics is not None:
            run.diagnostics.after_step(self.epoch, global_step, event.loss, event.logits)
        self.save_or_stop(event)

    def check_skips(self, event: StepEvent) -> None:
        """Log newly skipped steps (non-finite loss or gradient); stop once --max-skipped-steps consecutive ones
        were seen, counted across epochs (pgt.engine.SkipStreak)."""
        limit, state = self.run.args.max_skipped_steps, self.run.state
        skipped, longest = int(event.meters.skipped_steps), state.streak.take_longest()
        if skipped > self.reported_skips:
            log.warning('epoch %d step %d: %d step(s) skipped so far this epoch (non-finite loss or gradients)',
                        self.epoch, event.step, skipped)
            self.reported_skips = skipped
        if longest >= limit:
            raise TrainingDiverged(f'{longest} consecutive steps with a non-finite loss or gradient by epoch '
                                   f'{self.epoch} step {event.step} (limit --max-skipped-steps {limit}); skipped steps '
                                   f'changed nothing, and {state.newest_line()}')

    def save_or_stop(self, event: StepEvent) -> None:
        run, interval = self.run, self.run.args.recovery_interval
        stop = run.preemption.requested(event.step, event.steps_in_epoch)
        if stop or (interval and event.step % interval == 0 and event.step < event.steps_in_epoch):
            run.state.save_recovery(self.epoch, event.step, event.meters)
        if stop:
            barrier()
            raise Preempted(f'{run.preemption.signal_name or "signal"} at epoch {self.epoch} step {event.step}: '
                            f'recovery checkpoint in {run.run_dir}; continue with --resume auto')


def end_epoch(run: Training, epoch: int, train_metrics: dict, eval_metrics: dict) -> None:
    """The epoch-end writes, in this order: the summary row, then the checkpoints with last.pth's position last, so
    that a crash before it repeats the epoch, and the repeat writes the row and the files again
    (pgt/checkpoint.py)."""
    lr = run.parts.optimizer.param_groups[0]['lr']
    run_on_main(functools.partial(run.runlog.end_epoch, epoch, train_metrics, eval_metrics, lr), run.env.is_main)
    run.state.save_epoch_end(epoch, eval_metrics['top1'], run.args.checkpoint_interval)


# ---- checks

def check_resumable(resume: tuple[Path, dict], args, loaders: Loaders, world_size: int) -> None:
    """A checkpoint continues this run only if it was written by the same model, on the same classes, under the
    same configuration (unless --allow-config-change): otherwise two runs would be mixed in one. Within an epoch it
    also needs the same list of training images: the epoch's order is a permutation of that list."""
    path, state = resume
    if state.get('arch') != args.model:
        raise UsageError(f'{path} holds a {state.get("arch")} checkpoint; this run builds a {args.model}')
    if 'classes' in state:
        check_same_classes(loaders.classes, state['classes'], f'{args.data_dir}/train', f'the checkpoint {path}')
    check_same_images(path, state, loaders)
    changes = config_changes(state['args'], resolved_config(args, provenance=False), state['world_size'], world_size)
    if changes and not args.allow_config_change:
        raise UsageError(f'{path} was written under another configuration ({"; ".join(changes[:4])}); pass '
                         f'--allow-config-change to continue it anyway, or --output elsewhere for a new run')
    if changes:
        log.warning('continuing %s under a changed configuration: %s', path, '; '.join(changes))


def check_same_images(path: Path, state: dict, loaders: Loaders) -> None:
    """The training images of the checkpoint's run and of this one: a changed list refuses a resume within an epoch
    (its remaining batches would be drawn from another permutation), and is a warning at an epoch's end."""
    recorded = state.get('data') or {}
    if not (recorded.get('train_digest') and loaders.train_digest) or recorded['train_digest'] == loaders.train_digest:
        return
    epoch, step = resume_position(state)
    change = f'{recorded["train_images"]} images then, {loaders.train_images} now'
    if step:
        raise UsageError(f'{path} was written within epoch {epoch} on another list of training images ({change}); '
                         f'restore the images, or move {path.name} away to continue from the end of the epoch before')
    log.warning('the training images changed since %s (%s): the run continues on the new list', path, change)


def cli() -> None:
    """The ``pgt-train`` console command (and ``python train.py`` from a clone). Under torchrun, a restart after a
    final failure (bad input, divergence: the same again on every attempt) repeats its line and code at once, and
    every exit is reported to pgt-torchrun (pgt.launch)."""
    failed = final_failure()
    if failed is not None:
        code, line = failed
        print(f'{line} (not run again: an earlier attempt of this torchrun run ended so)', file=sys.stderr)
        report_exit(code, None)
        sys.exit(code)
    run_cli(main, on_exit=report_exit)


if __name__ == '__main__':
    cli()
