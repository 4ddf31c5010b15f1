"""Optimizer and learning-rate schedule, both from timm's factories."""
from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2


def build_optimizer(model: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """timm's 'sgd' is Nesterov SGD; weight decay skips biases and normalisation parameters (timm's default, as in the
    published code). Fused on CUDA, where it also lets the gradient scaler skip a step without a synchronisation."""
    extra = {'fused': True} if device.type == 'cuda' and args.opt in ('sgd', 'nesterov', 'momentum') else {}
    return create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, args, updates_per_epoch: int):
    """timm's scheduler and the number of epochs it implies (cosine adds --cooldown-epochs after --epochs).

    Stepped once per epoch by default, as the published runs were: ``scheduler.step(epoch)`` at the start of each
    epoch sets that epoch's rate, so a resumed run follows the same curve. ``--sched-on-updates`` steps every update.
    """
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    return scheduler, num_epochs



def total_epochs(args) -> int:
    """Epochs a configuration runs (timm adds cooldown epochs to the cosine cycle), without building a model."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    return build_scheduler(probe, args, updates_per_epoch=1)[1]
