"""Optimizer and learning-rate schedule, both from timm's factories."""
from __future__ import annotations

import torch
from timm.models import model_parameters
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2


def build_optimizer(model: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """timm's 'sgd' is Nesterov SGD; weight decay skips biases and normalisation parameters (timm's default, as in the
    published code). Fused on CUDA, where it also lets the gradient scaler skip a step without a synchronisation."""
    extra = {'fused': True} if device.type == 'cuda' and args.opt in ('sgd', 'nesterov', 'momentum') else {}
    return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, **extra)


# Optimizer options that choose an implementation, not the trajectory: the optimizer built for this run keeps its own
# on resume. A checkpoint written on a CPU (or before fused SGD was used) holds fused=None; loaded as it is into a
# fused CUDA optimizer, GradScaler.step fails with "Expected grad_scale and found_inf to be None".
IMPLEMENTATION_OPTIONS = ('fused', 'foreach', 'capturable', 'differentiable')


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this optimizer's implementation options."""
    own = [{key: group[key] for key in IMPLEMENTATION_OPTIONS if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, own):
        group.update(options)


def clip_parameters(model: torch.nn.Module, clip_mode: str) -> list[torch.Tensor]:
    """What gradient clipping acts on, as timm's train.py chooses it (``model_parameters(model, exclude_head='agc'
    in clip_mode)``): every parameter for norm and value clipping; for AGC all but the classifier, which Brock et
    al. (2021) exclude from it."""
    return list(model_parameters(model, exclude_head=clip_mode == 'agc'))


def build_scheduler(optimizer: torch.optim.Optimizer, args, updates_per_epoch: int):
    """timm's scheduler and the number of epochs it implies, exactly as timm's ``create_scheduler_v2`` makes them:
    a cosine adds --cooldown-epochs after --epochs, and --warmup-prefix puts the warmup before the --epochs of the
    schedule (the run is longer by the warmup); without it the warmup overlaps the schedule's start, so a cosine
    never reaches the peak. Stepped once per epoch by default (set_epoch_rate), every update with
    --sched-on-updates (set_update_rate)."""
    return create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        warmup_prefix=getattr(args, 'warmup_prefix', False), step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch)


def scheduled_epoch(epoch: int, origin: str = 'timm') -> int:
    """The point of the schedule whose rate epoch ``epoch`` trains at. timm (``scheduler.step(epoch)`` before the
    epoch): its own. fork, as the published train.py ran: its scheduler starts at the rate for 0, and after each
    epoch the loop counts the epoch up and then calls ``lr_scheduler.step(epoch + 1)``, so epoch k >= 1 trains at
    the rate for k + 1 (warmup 4e-4, 0.160, 0.240, 0.320, 0.397 at epoch 4; step drops at 29, 59, 89). An
    uninterrupted fork run; its resume (``step(start_epoch)``) would have trained that epoch at its own rate."""
    return epoch + 1 if origin == 'fork' and epoch > 0 else epoch


def set_epoch_rate(scheduler, epoch: int, args) -> None:
    """The learning rate of epoch ``epoch``, set before it starts (train.py, and anything that must agree)."""
    if scheduler is not None:
        scheduler.step(scheduled_epoch(epoch, getattr(args, 'schedule_origin', 'timm')))


def set_update_rate(scheduler, update: int, args) -> None:
    """With --sched-on-updates, the rate of the update after ``update`` updates of the run (timm's step_update)."""
    if scheduler is not None and args.sched_on_updates:
        scheduler.step_update(update)


def total_epochs(args) -> int:
    """Epochs a configuration runs (timm adds cooldown epochs to the cosine cycle), without building a model."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    return build_scheduler(probe, args, updates_per_epoch=1)[1]
