"""Train an ImageNet classifier with timm, optionally with the PowerGrad Transform (PGT).

    python train.py --config configs/smoke.yaml --data-dir DIR --output RUN        (from a clone; or pgt-train)
    torchrun --nproc-per-node 4 train.py -c configs/paper/resnet50-cosine-pgt.yaml --data-dir /imagenet

Reads top to bottom: configuration, data, model, optimizer and schedule, resume, then the epoch loop. Everything that
can refuse the run (options, data, model, checkpoint) is checked before the run directory is created. The pieces
live in pgt/; this module only wires them together.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from timm.data import Mixup
from timm.layers import convert_sync_batchnorm

from .checkpoint import (check_run_dir, find_resume_checkpoint, load_checkpoint, prepare_run_dir, rank_state,
                         rng_state, save_checkpoint, set_rng_state)
from .config import (config_changes, finalize_args, ignored_options_warning, parse_config, resolve_device_settings,
                     resolved_config, save_config)
from .data import build_loaders, check_same_classes
from .diagnostics import Diagnostics, series_layers
from .distributed import (all_gather_object, all_reduce_sum, barrier, broadcast_object, init_distributed,
                          run_on_main, shutdown)
from .engine import (AMP_DTYPES, BufferGuard, EpochMeters, SkipStreak, TrainingParts, evaluate, make_scaler,
                     to_device, train_one_epoch)
from .errors import Preempted, TrainingDiverged, UsageError, run_cli
from .models import create_model, load_model_state
from .optim import build_optimizer, build_scheduler, clip_parameters
from .preemption import PreemptionFlag
from .runlog import RunLog, setup_logging
from .transform import PowerGradCrossEntropy

log = logging.getLogger('pgt')


def main(argv) -> int:
    preemption = PreemptionFlag().install()  # until training starts, a signal stops the process at once (exit 75)

    # ---- configuration: defaults < recipe < command line, all checked before anything is written
    args = parse_config(argv)
    finalize_args(args, world_size=int(os.environ.get('WORLD_SIZE', 1)))
    if args.dry_run:
        print(yaml.safe_dump(resolved_config(args), sort_keys=False), end='')
        return 0
    resume = None
    if args.resume not in (None, 'auto'):
        resume = (Path(args.resume), load_checkpoint(args.resume))
    env = init_distributed()
    setup_logging(env.is_main)
    if ignored_options_warning(args):
        log.warning(ignored_options_warning(args))
    resolve_device_settings(args, env.device)
    if args.output is None:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        args.output = broadcast_object(str(Path(args.resume).parent) if resume else f'runs/{args.model}-{stamp}')
    run_dir = Path(args.output)
    check_run_dir(run_dir, args.resume, args.overwrite)
    loaders = build_loaders(args, env.rank, env.world_size, env.device)  # the data checks, before any write
    num_classes = args.num_classes = args.num_classes or loaders.num_classes
    if args.resume == 'auto':
        resume = find_resume_checkpoint(run_dir) if run_dir.is_dir() else None
        if resume is None:
            log.info('no checkpoint in %s: new run', run_dir)
    if resume is not None:
        check_resumable(resume, args, loaders.classes, env.world_size)
        log.info('resuming from %s', resume[0])

    torch.manual_seed(args.seed + env.rank)
    random.seed(args.seed + env.rank)
    np.random.seed(args.seed + env.rank)
    if env.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    # ---- model, optimizer and schedule
    model = create_model(args.model, num_classes=num_classes, **args.model_kwargs)
    if args.diagnostics:
        series_layers(model, args.diagnostics_layers)  # a layer the model lacks is refused before any write
    if args.sync_bn and env.distributed:
        model = convert_sync_batchnorm(model)
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args, env.device)
    steps_per_epoch = math.ceil(len(loaders.train) / args.grad_accum_steps)  # a last, partial update included
    scheduler, num_epochs = build_scheduler(optimizer, args, steps_per_epoch)
    amp_dtype = AMP_DTYPES[args.amp_dtype] if args.amp else None
    scaler = make_scaler(env.device, amp_dtype)

    # ---- resume: the same trajectory as if the run had never stopped
    start_epoch, start_step, meters, best = 0, 0, None, {'top1': -1.0, 'epoch': -1}
    streak = SkipStreak.zeros(env.device)
    newest = None  # the newest checkpoint of this run, for the message if training diverges
    if resume:
        state = resume[1]
        load_model_state(model, state['state_dict'], resume[0], args.model, num_classes)
        optimizer.load_state_dict(state['optimizer'])
        scaler.load_state_dict(state['scaler'])
        start_epoch, start_step, best = state['epoch'], state['step'], state['best']
        streak.load_state_dict(state['skip_streak'])
        rng, own_meters = rank_state(state, env.rank, env.world_size)
        set_rng_state(rng)
        meters = EpochMeters.from_state(own_meters, env.device) if own_meters and start_step else None
        newest = f'{resume[0]} (epoch {start_epoch}, step {start_step})'

    # ---- the run directory: created only now that nothing above refused the run
    if env.is_main:
        prepare_run_dir(run_dir, args.resume, args.overwrite)
    barrier()
    runlog = RunLog(run_dir, env.is_main, start_epoch, hparams=resolved_config(args))
    if env.is_main:
        save_config(args, run_dir / 'config.yaml')

    trained = model
    if env.distributed:
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == 'cuda' else None)
    if args.torchcompile:
        trained = torch.compile(trained, backend=args.torchcompile)
    alpha = args.pgt_alpha if args.pgt_alpha is not None else 1.0
    # Target checks read values back to the host: keep them off the GPU hot path (CUDA asserts on bad indices).
    loss_fn = PowerGradCrossEntropy(alpha, args.smoothing, check_targets=env.device.type != 'cuda')
    mixup = None
    if args.mixup or args.cutmix:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
    parts = TrainingParts(trained, loss_fn, optimizer, scaler, amp_dtype, args.clip_grad, args.clip_mode,
                          clip_parameters(model, args.clip_mode), args.channels_last, mixup,
                          buffer_guard=BufferGuard(model))

    def checkpoint_state(epoch, step, epoch_meters):
        """Everything to continue from (epoch, step): every rank's RNG state and partial-epoch meters."""
        ranks = all_gather_object({'rng': rng_state(),
                                   'meters': epoch_meters.state_dict() if epoch_meters is not None else None})
        return {'state_dict': model.state_dict(), 'arch': args.model, 'optimizer': optimizer.state_dict(),
                'scaler': scaler.state_dict(), 'epoch': epoch, 'step': step, 'best': dict(best),
                'skip_streak': streak.state_dict(), 'ranks': ranks, 'world_size': env.world_size,
                'args': resolved_config(args), 'num_classes': num_classes, 'classes': loaders.classes}

    def write_checkpoints(state, names):
        """Write ``state`` once, under each name of ``names`` in order (pgt.checkpoint), on rank 0; a failure stops
        every rank."""
        nonlocal newest
        require_finite(state['state_dict'], state['epoch'], state['step'], newest)
        run_on_main(lambda: save_checkpoint(state, [run_dir / name for name in names]), env.is_main)
        newest = f'{run_dir / names[-1]} (epoch {state["epoch"]}, step {state["step"]})'

    diagnostics = None
    if args.diagnostics and env.is_main:
        probe = to_device(*next(iter(loaders.val)), env.device, args.channels_last)
        diagnostics = Diagnostics(model, loss_fn, probe, args.diagnostics_interval, run_dir, runlog,
                                  args.diagnostics_mask, layers=args.diagnostics_layers)
        parts.grad_observer = diagnostics.observe_grads
    # Under DDP the ranks agree on a signal every k steps: a collective per step costs more than the latency it saves.
    preemption.agree_every = min(args.signal_check_interval, args.recovery_interval or args.signal_check_interval)
    preemption.training_started()

    # ---- the epoch loop
    for epoch in range(start_epoch, num_epochs):
        if scheduler is not None:
            scheduler.step(epoch)
        loss_fn.alpha = alpha if epoch >= args.pgt_start_epoch else 1.0
        skip = start_step if epoch == start_epoch else 0
        loaders.train.sampler.set_epoch(epoch, skip * args.grad_accum_steps)
        runlog.start_epoch(epoch, num_epochs, steps_per_epoch, skip)
        reported_skips = [0]
        unreadable_before = loaders.train_dataset.unreadable_count() if loaders.train_dataset else 0

        def on_step(event, epoch=epoch, reported_skips=reported_skips):
            global_step = epoch * steps_per_epoch + event.step
            if args.sched_on_updates and scheduler is not None:
                scheduler.step_update(global_step)
            scalars = None
            if event.step % args.log_interval == 0 or event.step == event.steps_in_epoch:
                scalars = {'loss': event.loss.item(), 'lr': optimizer.param_groups[0]['lr'],
                           'grad_norm': event.grad_norm.item()}
                check_skips(streak, event.meters, reported_skips, args.max_skipped_steps, epoch, event.step, newest)
            runlog.step(global_step, event, scalars)
            if diagnostics is not None:
                diagnostics.after_step(epoch, global_step, event.loss, event.logits)
            stop = preemption.requested(event.step, event.steps_in_epoch)
            if stop or (args.recovery_interval and event.step % args.recovery_interval == 0
                        and event.step < event.steps_in_epoch):
                write_checkpoints(checkpoint_state(epoch, event.step, event.meters), ['recovery.pth'])
                if stop:
                    barrier()
                    raise Preempted(f'{preemption.signal_name or "signal"} at epoch {epoch} step {event.step}: '
                                    f'recovery checkpoint in {run_dir}; continue with --resume auto')

        train_metrics = train_one_epoch(parts, loaders.train, env.device, args.grad_accum_steps, skip,
                                        meters if epoch == start_epoch else None, streak, on_step)
        if train_metrics['skipped_steps'] >= steps_per_epoch:
            raise TrainingDiverged(f'every step of epoch {epoch} had a non-finite loss or gradient, so the model did '
                                   f'not change; {newest_checkpoint_line(newest)}')
        if loaders.train_dataset is not None:
            unreadable = torch.tensor([loaders.train_dataset.unreadable_count() - unreadable_before])
            train_metrics['unreadable'] = int(all_reduce_sum(unreadable.to(env.device)).item())
        eval_metrics = evaluate(trained, loaders.val, env.device, amp_dtype, args.channels_last, progress=env.is_main)
        lr = optimizer.param_groups[0]['lr']
        # Epoch-end writes, in this order: the position in last.pth comes last, so a crash before it repeats the
        # epoch, and the repeat writes the summary row, best.pth and epoch_<N>.pth again (pgt/checkpoint.py).
        run_on_main(lambda: runlog.end_epoch(epoch, train_metrics, eval_metrics, lr), env.is_main)
        is_best = eval_metrics['top1'] > best['top1']
        if is_best:
            best.update(top1=eval_metrics['top1'], epoch=epoch)
        names = ['best.pth'] if is_best else []
        if args.checkpoint_interval and (epoch + 1) % args.checkpoint_interval == 0:
            names.append(f'epoch_{epoch + 1}.pth')
        write_checkpoints(checkpoint_state(epoch + 1, 0, None), names + ['last.pth'])
        if args.stop_after_epoch is not None and epoch >= args.stop_after_epoch and epoch + 1 < num_epochs:
            log.info('stopping after epoch %d as asked (--stop-after-epoch); continue with --resume auto', epoch)
            break
    runlog.close()
    if best['epoch'] >= 0:
        log.info('best eval top-1 %.2f at epoch %d; run directory %s', best['top1'], best['epoch'], run_dir)
    barrier()
    shutdown()
    return 0


def check_resumable(resume: tuple[Path, dict], args, classes: list[str], world_size: int) -> None:
    """A checkpoint continues this run only if it was written by the same model, on the same classes, under the
    same configuration (unless --allow-config-change): otherwise two runs would be mixed in one."""
    path, state = resume
    if state.get('arch') != args.model:
        raise UsageError(f'{path} holds a {state.get("arch")} checkpoint; this run builds a {args.model}')
    if 'classes' in state:
        check_same_classes(classes, state['classes'], f'{args.data_dir}/train', f'the checkpoint {path}')
    changes = config_changes(state['args'], resolved_config(args), state['world_size'], world_size)
    if changes and not args.allow_config_change:
        raise UsageError(f'{path} was written under another configuration ({"; ".join(changes[:4])}); pass '
                         f'--allow-config-change to continue it anyway, or --output elsewhere for a new run')
    if changes:
        log.warning('continuing %s under a changed configuration: %s', path, '; '.join(changes))


def require_finite(model_state: dict, epoch: int, step: int, newest: str | None) -> None:
    """Never write a checkpoint with non-finite weights or buffers over a good one (one sync, at checkpoints)."""
    floats = [t for t in model_state.values() if t.is_floating_point()]
    if not torch.stack([torch.isfinite(t).all() for t in floats]).all():
        bad = [name for name, t in model_state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        raise TrainingDiverged(f'non-finite values in {", ".join(bad[:3])} at epoch {epoch} step {step}, so no '
                               f'checkpoint was written; {newest_checkpoint_line(newest)}')


def newest_checkpoint_line(newest: str | None) -> str:
    return f'the newest checkpoint is {newest}' if newest else 'no checkpoint had been written'


def check_skips(streak: SkipStreak, meters: EpochMeters, reported: list, limit: int, epoch: int, step: int,
                newest: str | None) -> None:
    """Log newly skipped steps (non-finite loss or gradient); stop once ``limit`` consecutive ones were seen."""
    skipped, longest = int(meters.skipped_steps), streak.take_longest()
    if skipped > reported[0]:
        log.warning('epoch %d step %d: %d step(s) skipped so far this epoch (non-finite loss or gradients)',
                    epoch, step, skipped)
        reported[0] = skipped
    if longest >= limit:
        raise TrainingDiverged(f'{longest} consecutive steps with a non-finite loss or gradient by epoch {epoch} '
                               f'step {step} (limit --max-skipped-steps {limit}); skipped steps changed nothing, '
                               f'and {newest_checkpoint_line(newest)}')


def cli() -> None:
    """The ``pgt-train`` console command (and ``python train.py`` from a clone)."""
    run_cli(main)


if __name__ == '__main__':
    cli()
