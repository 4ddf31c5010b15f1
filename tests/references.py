"""Independent float64 references used by the tests (never the code under test)."""
import math

import numpy as np
import torch


def softmax64(logits) -> np.ndarray:
    z = np.asarray(torch.as_tensor(logits).detach().double().cpu().numpy())
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def q64(target, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    t = torch.as_tensor(target).detach().cpu()
    if t.dim() == 2:
        return t.double().numpy()
    q = np.full((t.shape[0], num_classes), smoothing / num_classes)
    q[np.arange(t.shape[0]), t.numpy()] += 1.0 - smoothing
    return q


def pgt_grad64(logits, target, alpha: float, smoothing: float = 0.0, reduction: str = 'mean') -> np.ndarray:
    """Eq. 5-6 written literally: power the probabilities, normalise, subtract q; 1/N for 'mean'."""
    p = softmax64(logits)
    powered = p ** alpha
    p_prime = powered / powered.sum(-1, keepdims=True)
    grad = p_prime - q64(target, p.shape[1], smoothing)
    return grad / p.shape[0] if reduction == 'mean' else grad


def ce_loss64(logits, target, smoothing: float = 0.0) -> np.ndarray:
    p = softmax64(logits)
    return -(q64(target, p.shape[1], smoothing) * np.log(p)).sum(-1)


def published_hook(grad: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """The backward hook of the ICLR submission's Fig. 5, verbatim in its arithmetic (labels one-hot [N, C])."""
    grad_temp = grad / grad.shape[0]
    pred = grad_temp + labels
    pred = pred ** alpha
    pred /= pred.sum(-1, keepdim=True)
    modified_grad = pred - labels
    return modified_grad * grad.shape[0]


def rel_err(actual, expected) -> float:
    """Largest absolute difference relative to the largest reference magnitude (entries near 0 do not blow it up)."""
    a = torch.as_tensor(actual).double().cpu().numpy()
    e = np.asarray(expected, dtype=np.float64)
    return float(np.abs(a - e).max() / np.abs(e).max())


# ---- the published code's learning-rate schedule

def fork_rate(t, args):
    """lr_scheduler._get_lr(t) of the 2021 timm the published code vendors (timm/scheduler/cosine_lr.py and
    step_lr.py, as its create_scheduler builds them: t_mul 1, cycle_limit 1, warmup not a prefix), in float64."""
    if t < args.warmup_epochs:
        return args.warmup_lr + t * (args.lr - args.warmup_lr) / args.warmup_epochs
    if args.sched == 'step':
        return args.lr * args.decay_rate ** (t // args.decay_epochs)
    cycle = t // args.epochs
    if cycle < 1:
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * (t - args.epochs * cycle)
                                                                           / args.epochs))
    return args.min_lr


def fork_epoch_rates(args):
    """The published train.py's epoch loop (--train-continuous 1), written out: the scheduler's constructor sets
    the warmup's first rate; after each epoch the loop counts the epoch up, evaluates, and calls
    lr_scheduler.step(epoch + 1); it stops once epoch >= num_epochs (cosine: epochs + cooldown; step: epochs)."""
    num_epochs = args.epochs + args.cooldown_epochs if args.sched == 'cosine' else args.epochs
    lr, rates, epoch = (args.warmup_lr if args.warmup_epochs else args.lr), [], 0
    while True:
        rates.append(lr)  # train_one_epoch(epoch, ...)
        epoch += 1
        lr = fork_rate(epoch + 1, args)
        if epoch >= num_epochs:
            return rates
