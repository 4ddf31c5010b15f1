"""The training step, one training epoch and evaluation, as plain functions (torchvision references style).

Hot-path rules: no host-device synchronisation inside a step; metrics accumulate in device tensors and are read at
logging intervals and at the end of the epoch. The gradient scaler is used at every precision because it is
PyTorch's way to skip an optimizer step whose gradients are not finite, on the device, without a synchronisation
when the optimizer is fused; at bfloat16 and float32 it starts at scale 1 and only moves after an overflow.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from tqdm import tqdm

from .distributed import all_reduce_sum, world_size
from .errors import LoaderFailed, end_worker_processes, one_line

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}  # --amp-dtype names


@dataclass
class TrainingParts:
    """What a training step needs, built once by train.py (and by scripts/benchmark.py)."""
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None = None
    clip_grad: float | None = None
    clip_mode: str = 'norm'
    clip_params: list[torch.Tensor] | None = None  # what clipping acts on (default: every optimized parameter)
    channels_last: bool = False
    mixup: Callable | None = None
    grad_observer: Callable[[float], None] | None = None  # sees the unscaled gradients before the update (lr)
    buffer_guard: BufferGuard | None = None  # undoes a skipped update's changes to buffers (BN statistics)
    # The total gradient norm, logged and used to count skipped steps. Only benchmark.py's timm-like step, which
    # times what timm's benchmark times, goes without it (and then reports a norm of 0).
    track_grad_norm: bool = True

    def autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)


def make_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """float16: PyTorch's dynamic loss scaling. bfloat16 and float32 need no scaling, only the skip of non-finite
    updates: the scale stays 1, and a skipped update leaves it unchanged (the constructor refuses a backoff factor
    of 1, the setter does not), so that a skip changes no state at all."""
    if amp_dtype == torch.float16:
        return torch.amp.GradScaler(device.type)
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2 ** 30)
    scaler.set_backoff_factor(1.0)
    return scaler


@dataclass
class EpochMeters:
    """Running sums of an epoch on one rank, kept on the device; saved (per rank) in recovery checkpoints to resume
    mid-epoch exactly."""
    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: torch.Tensor
    skipped_steps: torch.Tensor

    @classmethod
    def zeros(cls, device):
        z = lambda dtype: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
        return cls(z(torch.float64), z(torch.int64), z(torch.int64), z(torch.int64))

    def add(self, losses: list[torch.Tensor], logits: list[torch.Tensor], targets: list[torch.Tensor],
            finite: torch.Tensor) -> None:
        """Count one update's micro-batches, or only the skip when ``finite`` is False (no sync: device selects)."""
        for loss, out, target in zip(losses, logits, targets):
            self.loss_sum += torch.where(finite, loss.double() * target.shape[0], 0.0)
            self.correct += torch.where(finite, (out.argmax(-1) == target).sum(), 0)
            self.seen += torch.where(finite, target.shape[0], 0)
        self.skipped_steps += (~finite).long()

    def state_dict(self):
        return {k: v.cpu() for k, v in self.__dict__.items()}

    @classmethod
    def from_state(cls, state, device):
        return cls(**{k: v.to(device) for k, v in state.items()})


@dataclass
class SkipStreak:
    """Consecutive skipped updates (non-finite loss or gradients), counted across epoch boundaries so that a
    divergence does not start again from zero with each epoch. ``longest`` is the longest streak since the last
    ``take_longest``, so that checking only at logging intervals misses no streak. Device tensors: no sync per step."""
    current: torch.Tensor
    longest: torch.Tensor

    @classmethod
    def zeros(cls, device):
        return cls(torch.zeros((), dtype=torch.int64, device=device), torch.zeros((), dtype=torch.int64, device=device))

    def update(self, finite: torch.Tensor) -> None:
        self.current.copy_(torch.where(finite, 0, self.current + 1))
        torch.maximum(self.longest, self.current, out=self.longest)

    def take_longest(self) -> int:
        longest = int(self.longest)
        self.longest.copy_(self.current)
        return longest

    def state_dict(self):
        return {'current': int(self.current)}

    def load_state_dict(self, state):
        self.current.fill_(state['current'])
        self.longest.fill_(state['current'])


class BufferGuard:
    """Undoes what the forward pass of a skipped update did to the module's buffers (batch-norm running statistics
    and their counters). The scaler skips an update whose gradients are not finite, leaving weights and optimizer
    state as they were; the buffers must stay too, or one NaN batch leaves NaN running statistics in every later
    checkpoint. No host synchronisation: the buffers are flattened per dtype before the step and selected back with
    torch.where after it, a handful of kernels per step whatever the model's size."""

    def __init__(self, module: torch.nn.Module):
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in module.buffers():
            if buffer.numel():
                groups.setdefault(buffer.dtype, []).append(buffer)
        self.groups = list(groups.values())
        self.saved: list[torch.Tensor] = []

    @staticmethod
    def _flat(group):
        return torch.cat([b.reshape(-1) for b in group])

    def save(self) -> None:
        self.saved = [self._flat(group) for group in self.groups]

    def restore_unless(self, finite: torch.Tensor) -> None:
        for group, saved in zip(self.groups, self.saved):
            kept = torch.where(finite, self._flat(group), saved)
            torch._foreach_copy_(group, [part.view_as(b) for part, b in zip(kept.split([b.numel() for b in group]),
                                                                             group)])


def to_device(images, targets, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def train_step(parts: TrainingParts, micro_batches, device: torch.device):
    """One optimizer update over ``micro_batches`` [(images, targets), ...] already on the device (gradient
    accumulation when there are several). Returns (per-micro-batch losses, logits, total gradient norm); the norm
    is non-finite exactly when the scaler skips the update."""
    model, n = parts.model, len(micro_batches)
    losses, logits_list = [], []
    if parts.buffer_guard is not None:
        parts.buffer_guard.save()
    for i, (images, targets) in enumerate(micro_batches):
        # DDP: all-reduce gradients only on the last micro-batch of the update.
        sync = i == n - 1 or not hasattr(model, 'no_sync')
        with contextlib.nullcontext() if sync else model.no_sync():
            with parts.autocast(device):
                logits = model(images)
                loss = parts.loss_fn(logits, targets)
            parts.scaler.scale(loss / n).backward()
        losses.append(loss.detach())
        logits_list.append(logits.detach())
    grad_norm = optimizer_update(parts)
    if parts.buffer_guard is not None:
        parts.buffer_guard.restore_unless(torch.isfinite(grad_norm))
    return losses, logits_list, grad_norm


def optimizer_update(parts: TrainingParts) -> torch.Tensor:
    parts.scaler.unscale_(parts.optimizer)
    params = [p for group in parts.optimizer.param_groups for p in group['params'] if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if parts.track_grad_norm else \
        torch.zeros((), device=params[0].device)
    if parts.grad_observer is not None:
        parts.grad_observer(parts.optimizer.param_groups[0]['lr'])
    if parts.clip_grad is not None:
        clipped = params if parts.clip_params is None else [p for p in parts.clip_params if p.grad is not None]
        dispatch_clip_grad(clipped, parts.clip_grad, mode=parts.clip_mode)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass
class StepEvent:
    """Passed to the epoch's ``on_step`` callback after every update."""
    step: int
    steps_in_epoch: int
    meters: EpochMeters
    logits: torch.Tensor
    loss: torch.Tensor
    grad_norm: torch.Tensor
    images: int  # in this update, on this rank
    data_seconds: float  # host time spent waiting for input so far this epoch


def train_one_epoch(parts: TrainingParts, loader, device: torch.device, accum_steps: int = 1, start_step: int = 0,
                    meters: EpochMeters | None = None, streak: SkipStreak | None = None,
                    on_step: Callable[[StepEvent], None] | None = None) -> dict:
    """Train over ``loader`` from update ``start_step`` on; ``on_step`` runs after each update (logging,
    checkpoints, preemption, diagnostics). With gradient accumulation, micro-batches left at the end of the epoch
    make a last, smaller update (as timm's train.py does), so that every batch is trained on. Returns the epoch's
    loss, top-1 (running average over the epoch, as the published logs report), images/s and skipped steps, over
    all ranks."""
    parts.model.train()
    meters = meters or EpochMeters.zeros(device)
    streak = streak or SkipStreak.zeros(device)
    steps_in_epoch = start_step + math.ceil(len(loader) / accum_steps)
    batches = TimedBatches(loader)
    step, images_seen, timer = start_step, 0, None
    for micro in accumulated(batches, parts, device, accum_steps):
        losses, logits, grad_norm = train_step(parts, [(x, y) for x, y, _ in micro], device)
        finite = torch.isfinite(grad_norm)
        meters.add(losses, logits, [hard for *_, hard in micro], finite)
        streak.update(finite)
        step += 1
        images = sum(hard.shape[0] for *_, hard in micro)
        if timer is None:  # time from the end of the first step: excludes start-up and compilation
            timer = _synchronized_clock(device)
        else:
            images_seen += images
        if on_step is not None:
            on_step(StepEvent(step, steps_in_epoch, meters, logits[-1], losses[-1], grad_norm, images,
                              batches.waited))
    elapsed = _synchronized_clock(device) - timer if timer is not None else 0.0
    return epoch_metrics(meters, images_seen, elapsed)


def accumulated(batches, parts: TrainingParts, device: torch.device, accum_steps: int):
    """The micro-batches of each update, [(images, targets, hard targets), ...] on the device (targets mixed when
    mixup or cutmix is on): ``accum_steps`` per update, and the epoch's remainder as a last, smaller one."""
    micro = []
    for images, targets in batches:
        images, targets = to_device(images, targets, device, parts.channels_last)
        hard = targets
        if parts.mixup is not None:
            images, targets = parts.mixup(images, targets)
        micro.append((images, targets, hard))
        if len(micro) == accum_steps:
            yield micro
            micro = []
    if micro:
        yield micro


class TimedBatches:
    """Iterates a loader (loader_batches), adding up in ``waited`` the host time spent waiting for its batches."""

    def __init__(self, loader):
        self.loader, self.waited = loader, 0.0

    def __iter__(self):
        iterator = loader_batches(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield batch


def loader_batches(loader):
    """The batches of ``loader``; a worker that died, or delivered nothing within the loader's timeout, ends the
    run with one line instead of torch's traceback (or, without a timeout, a wait that never ends)."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            if 'DataLoader timed out' not in str(error) and 'DataLoader worker' not in str(error):
                raise
            end_worker_processes()  # a hung worker ignores the SIGTERM that torch's shutdown would wait on
            raise LoaderFailed(f'{one_line(error)}: a data loader worker died or hung (its own error, if it printed '
                               f'one, is above; in a container, a /dev/shm too small for the batches hangs them)') \
                from None
        yield batch


def _synchronized_clock(device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()


def epoch_metrics(meters: EpochMeters, images_seen: int, elapsed: float) -> dict:
    totals = torch.stack([meters.loss_sum, meters.correct.double(), meters.seen.double(),
                          meters.skipped_steps.double()])
    rate = torch.tensor([images_seen / elapsed if elapsed > 0 else 0.0], dtype=torch.float64, device=totals.device)
    all_reduce_sum(totals)
    all_reduce_sum(rate)  # images/s of all ranks together
    loss_sum, correct, seen, skipped = totals.tolist()
    skipped /= world_size()  # every rank skips the same updates (the gradients are all-reduced before the check)
    return {'loss': loss_sum / seen if seen else math.nan, 'top1': 100.0 * correct / seen if seen else math.nan,
            'img_per_sec': rate.item(), 'skipped_steps': int(skipped)}


def logit_statistic_sums(logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image logit statistics summed over the batch (the published code's --logit-stats), float64:
    [sum ||z||_2, sum |mean_i z_i|, sum |max_i z_i|, sum var_i z_i] (variance over classes, population form);
    images where ``keep`` is False count zero."""
    z = logits.double()
    per_image = torch.stack([z.norm(dim=-1), z.mean(-1).abs(), z.max(-1).values.abs(), z.var(-1, unbiased=False)])
    if keep is not None:
        per_image = per_image * keep
    return per_image.sum(-1)


LOGIT_STAT_NAMES = ('logit_norm', 'logit_mean', 'logit_max', 'logit_var')


def evaluate(model: torch.nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, progress: bool = False) -> dict:
    """Cross-entropy, top-1, top-5 and logit statistics over every image of ``loader`` (each rank its shard,
    summed over ranks). ``progress`` shows a bar on a terminal."""
    sums = evaluation_sums(model, loader, device, amp_dtype, channels_last, progress)
    loss, top1, top5, n, unreadable, *stats = all_reduce_sum(sums).tolist()  # the one host synchronisation
    result = {'loss': loss / n if n else math.nan, 'top1': 100 * top1 / n if n else math.nan,
              'top5': 100 * top5 / n if n else math.nan, 'images': int(n), 'unreadable': int(unreadable)}
    result.update({name: value / n if n else math.nan for name, value in zip(LOGIT_STAT_NAMES, stats)})
    return result


@torch.no_grad()
def evaluation_sums(model: torch.nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, progress: bool = False) -> torch.Tensor:
    """The sums behind evaluate, on the device: [loss, top-1, top-5, images, unreadable, 4 logit statistics]. Images
    the loader could not read carry target -1: counted as unreadable and left out by weights rather than by
    indexing, so that no batch waits for the host."""
    model.eval()
    sums = torch.zeros(9, dtype=torch.float64, device=device)  # loss, top1, top5, n, unreadable, 4 logit stats
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    batches = tqdm(loader_batches(loader), total=len(loader), desc='validate', unit='batch', leave=False,
                   file=sys.stderr, disable=None if progress else True, mininterval=1.0)
    for images, targets in batches:
        images, targets = to_device(images, targets, device, channels_last)
        with autocast:
            logits = model(images)
        logits, keep = logits.float(), targets >= 0
        top5 = logits.topk(min(5, logits.shape[1]), dim=-1).indices  # a target of -1 matches no class
        sums += torch.cat([
            torch.stack([F.cross_entropy(logits, targets, ignore_index=-1, reduction='sum').double(),
                         (top5[:, 0] == targets).sum().double(), (top5 == targets[:, None]).any(-1).sum().double(),
                         keep.sum().double(), (~keep).sum().double()]),
            logit_statistic_sums(logits, keep)])
    return sums
