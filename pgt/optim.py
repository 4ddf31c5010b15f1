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
    """timm's scheduler and the number of epochs it implies (cosine adds --cooldown-epochs after --epochs).

    Stepped once per epoch by default, as the published runs were: ``scheduler.step(epoch)`` at the start of each
    epoch sets that epoch's rate, so a resumed run follows the same curve. ``--sched-on-updates`` steps every update.

    Without --warmup-prefix the cosine runs over epochs 0 to --epochs and the warmup overlaps its start (timm's
    default, and the published runs'): the peak is never reached. With it, the cosine starts at the peak at the end of
    the warmup and still ends at --epochs: timm's ``warmup_prefix`` with ``num_epochs`` reduced by the warmup, since
    timm would otherwise add the warmup to the run's length.
    """
    cosine_epochs = args.epochs - args.warmup_epochs if getattr(args, 'warmup_prefix', False) else args.epochs
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=cosine_epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        warmup_prefix=getattr(args, 'warmup_prefix', False), step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch)
    return scheduler, num_epochs


def total_epochs(args) -> int:
    """Epochs a configuration runs (timm adds cooldown epochs to the cosine cycle), without building a model."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    return build_scheduler(probe, args, updates_per_epoch=1)[1]
