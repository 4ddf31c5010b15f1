"""Training diagnostics (``--diagnostics``): logit statistics, zeroed-out filters and dead pooled features (the
papers' Fig. 4-6), and the gradient-conditioning metrics of the thesis, logged every ``--diagnostics-interval`` steps
to TensorBoard under ``diagnostics/`` and to ``diagnostics.csv``, from rank 0.

Notation: g(w, X) is the mean gradient of the training loss (PGT included) over a batch X at weights w, flattened
over all parameters, optionally through a fixed random mask (Sec. 1.6). Metrics, with their cost:

- step-consistency (thesis Def. 2.5, the between-steps estimate below Eq. 2.24, n = 1):
  kappa = ||g(w_{t+1}, X_{t+1}) - g(w_t, X_t)|| ||w_t|| / (lr ||g(w_t, X_t)||^2), from the gradients of two
  consecutive training steps on their own (different, i != j) batches, as the thesis allows for this cheap estimate;
  the step is taken as omega = -lr g (the formula's assumption; momentum makes the real step differ).
  Cost: two gradient copies per interval, no extra pass.
- gradient diversity (Def. 3.12, Eq. 3.25): sum_i ||g_i||^2 / ||sum_i g_i||^2 over k micro-batches of the probe batch.
- gradient confusion (Def. 3.11, Eq. 3.24): -min(min_{i<j} cos(g_i, g_j), 0) over all pairs of those micro-batches.
  Cost of both: one forward and backward of the probe batch, k gradient vectors in memory.
- gradient coherence (Def. 3.13, Eq. 3.26): sum_i <mean_j g_j, g_i> / sum_i ||g_i||^2 over per-example gradients
  g_i of a small probe batch (torch.func vmap; batch norm in eval mode, since per-example statistics are degenerate).
  Cost: per-example gradients, b gradient vectors in memory (the mask shrinks them).
- logit statistics of the training batch (mean L2 norm, |mean|, |max|, variance; pgt.engine) next to its loss.
  Cost: negligible.
- filters: per conv layer, the L2 norm of every output filter (histograms) and the number below ZERO_FILTER_EPS;
  pooled features: how many global-average-pooled features are zero for every image of the probe batch. Cost: one
  pass over the weights, one forward of the probe batch.
- the series of the papers' Fig. 5: for the weight layers of ``layers`` (default 11 and 19), the L2 norm of each
  output filter, ||W_k[f]||_2, and for the pooled features the L2 norm of each feature over the probe batch,
  ||h[:, j]||_2, to ``filter_norms.csv`` (epoch, step, series, index, norm). Layers are numbered as the papers count
  them: the weight tensors with more than one dimension (convolutions and the classifier), in the order
  ``model.parameters()`` lists them, from 0. For ResNet-18 that is conv1 = 0, ..., layer3.0.conv2 = 11 (Fig. 5a),
  ..., layer4.1.conv2 = 19, the last convolution (Fig. 5b), and the classifier = 20.

The probe batch is the first PROBE_IMAGES images of the first validation batch (fixed and deterministic). Probes
run on the unwrapped model with the training RNG forked, buffers (batch-norm statistics) and train/eval mode
restored, and gradients cleared, so the training trajectory is the same with diagnostics on or off. With
SyncBatchNorm (--sync-bn) they run on a copy of the model with plain batch norm, refreshed from the training weights
before each probe: a train-mode forward of SyncBatchNorm is a collective, which rank 0 alone would wait in forever.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from .engine import LOGIT_STAT_NAMES, logit_statistic_sums
from .errors import UsageError
from .transform import power_grad_cross_entropy

# The probes run in float32 on at most this many images of the first validation batch. A train-mode micro-batch keeps
# its activations for the backward: about 133 MB per 224 px image for ResNet-50 and 198 MB for ResNet-101 (the sum
# of every layer's float32 output, counted with forward hooks). At a recipe's 256 images per GPU, micro-batches of 64
# would add 8.5 GB (ResNet-50) to 12.7 GB (ResNet-101) to rank 0 beside training: more than a 16 GB V100 has left.
# At 32 images, 4 micro-batches of 8 and 8 per-example gradients, the probes add about 3 GB for ResNet-101.
PROBE_IMAGES = 32
ZERO_FILTER_EPS = 1e-5  # a live filter has norm of order 1 at He initialisation; weight decay drives dead ones to 0
COLUMNS = ('epoch', 'step', 'loss', *LOGIT_STAT_NAMES, 'step_consistency', 'gradient_diversity', 'gradient_confusion',
           'gradient_coherence', 'zeroed_filters', 'dead_pooled_features')


class GradientMask:
    """Sec. 1.6: the same fraction of every parameter tensor, at least one element, chosen once at random."""

    def __init__(self, params, fraction: float, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.indices = [torch.randperm(p.numel(), generator=gen)[:max(1, math.ceil(fraction * p.numel()))]
                        .to(p.device) for p in params]

    def __call__(self, tensors) -> torch.Tensor:
        return torch.cat([t.reshape(-1)[i] for t, i in zip(tensors, self.indices)])


def flatten(tensors, mask: GradientMask | None = None) -> torch.Tensor:
    """Concatenate (masked) tensors into one float64 vector."""
    tensors = list(tensors)
    flat = mask(tensors) if mask is not None else torch.cat([t.reshape(-1) for t in tensors])
    return flat.double()


def step_consistency(g_prev: torch.Tensor, g_next: torch.Tensor, weight_norm: float, lr: float) -> float:
    return float((g_next - g_prev).norm() * weight_norm / (lr * g_prev.norm() ** 2))


def gradient_diversity(grads: list[torch.Tensor]) -> float:
    return float(sum(g.dot(g) for g in grads) / torch.stack(grads).sum(0).pow(2).sum())


def gradient_confusion(grads: list[torch.Tensor]) -> float:
    unit = torch.nn.functional.normalize(torch.stack(grads), dim=1)
    cos = unit @ unit.T
    upper = cos[torch.triu_indices(len(grads), len(grads), offset=1).unbind()]
    return float(-torch.clamp(upper.min(), max=0.0))


def gradient_coherence(per_example: torch.Tensor) -> float:
    mean = per_example.mean(0)
    return float((per_example @ mean).sum() / per_example.pow(2).sum())


@contextlib.contextmanager
def isolated(model: nn.Module):
    """Run probes without touching training: forked RNG, buffers and mode restored, gradients cleared after."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(training)
        for p in model.parameters():
            p.grad = None


def micro_batch_gradients(model, loss_fn, images, targets, k: int, mask=None) -> list[torch.Tensor]:
    """Mean gradient of each of k equal micro-batches, in train mode (as in training)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for x, y in zip(images.chunk(k), targets.chunk(k)):
        g = torch.autograd.grad(loss_fn(model(x), y), params)
        grads.append(flatten(g, mask))
    return grads


def per_example_gradients(model, loss_fn, images, targets, mask=None) -> torch.Tensor:
    """[b, d] per-example gradients with torch.func; batch norm in eval mode."""
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of_one(p, x, y):
        return loss_fn(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, images, targets)
    return torch.stack([flatten([grads[n][i] for n in names], mask) for i in range(images.shape[0])])


def filter_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of every output filter of every Conv2d."""
    return {name: m.weight.detach().flatten(1).norm(dim=1) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


def count_zeroed_filters(norms: dict[str, torch.Tensor], eps: float = ZERO_FILTER_EPS) -> dict[str, int]:
    return {name: int((n < eps).sum()) for name, n in norms.items()}


def weight_layers(named_tensors) -> list[tuple[str, torch.Tensor]]:
    """The weight layers as the papers number them: of a model's ``named_parameters()`` (or a checkpoint's state
    dict, in the same order), the tensors with more than one dimension."""
    return [(name, p) for name, p in named_tensors if p.dim() > 1]


@torch.no_grad()
def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[batch, features]: the global-average-pooled features (timm's pre-logits), in eval mode."""
    model.eval()
    return model.forward_head(model.forward_features(images), pre_logits=True)


def dead_pooled_features(model: nn.Module, images: torch.Tensor) -> int:
    """Global-average-pooled features that are zero for every image."""
    return int((pooled_features(model, images).abs().amax(0) == 0).sum())


def series_layers(model: nn.Module, layers) -> dict[str, str]:
    """{'layer<k>': parameter name} for the weight layers of ``layers``; a number the model lacks is an error."""
    named = weight_layers(model.named_parameters())
    if any(k >= len(named) for k in layers):
        raise UsageError(f'--diagnostics-layers: {model.__class__.__name__} has weight layers 0-{len(named) - 1}, '
                         f'got {", ".join(map(str, layers))}')
    return {f'layer{k}': named[k][0] for k in layers}


def with_plain_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every SyncBatchNorm replaced by a BatchNorm2d of the same parameters and statistics;
    ``model`` itself when it has none."""
    if not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return model
    model = copy.deepcopy(model)

    def revert(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.SyncBatchNorm):
                plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain.to(child.running_mean.device if child.track_running_stats
                                               else child.weight.device))
            else:
                revert(child)

    revert(model)
    return model


class Diagnostics:
    """Wired into train.py: ``observe_grads`` runs inside the optimizer update (via TrainingParts.grad_observer),
    ``after_step`` after each update. Only rank 0 builds one."""

    def __init__(self, model, train_loss, probe, interval: int, run_dir: Path, runlog, mask_fraction: float = 0.0,
                 micro_batches: int = 4, coherence_examples: int = 8, layers: tuple = ()):
        self.model, self.interval, self.runlog = model, interval, runlog
        self.probe_model = with_plain_batch_norm(model)
        self.layers = series_layers(model, layers)
        # The training loss at its current alpha (--pgt-start-epoch changes it), without the target checks, which
        # read values back to the host and cannot run under vmap.
        self.loss_fn = lambda logits, y: power_grad_cross_entropy(logits, y, train_loss.alpha, train_loss.smoothing,
                                                                  check_targets=False)
        self.images, self.targets = probe[0][:PROBE_IMAGES], probe[1][:PROBE_IMAGES]
        self.micro_batches, self.coherence_examples = micro_batches, coherence_examples
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.mask = GradientMask(self.params, mask_fraction) if mask_fraction else None
        self.csv = Path(run_dir) / 'diagnostics.csv'
        self.series_csv = Path(run_dir) / 'filter_norms.csv'
        self.updates, self.previous, self.kappa = 0, None, math.nan

    def observe_grads(self, lr: float) -> None:
        """Keep the gradient of the step before an interval step; at the interval step, compute step-consistency."""
        params = self.params
        self.updates += 1
        if self.previous is not None:
            g_prev, weight_norm, prev_lr = self.previous
            self.kappa = step_consistency(g_prev, flatten((p.grad for p in params), self.mask), weight_norm, prev_lr)
            self.previous = None
        if (self.updates + 1) % self.interval == 0:
            weight_norm = float(flatten(p.detach() for p in params).norm())
            self.previous = (flatten((p.grad for p in params), self.mask), weight_norm, lr)

    def after_step(self, epoch: int, global_step: int, loss: torch.Tensor, logits: torch.Tensor) -> None:
        if self.updates % self.interval:
            return
        row = {'epoch': epoch, 'step': global_step, 'loss': float(loss)}
        stats = logit_statistic_sums(logits.float()) / logits.shape[0]
        row.update(zip(LOGIT_STAT_NAMES, stats.tolist()))
        row['step_consistency'], self.kappa = self.kappa, math.nan
        probe = self.probe_model
        if probe is not self.model:
            probe.load_state_dict(self.model.state_dict())
        # Each probe isolated on its own: the train-mode micro-batch passes move batch-norm statistics, which the
        # eval-mode probes after them must not see.
        with isolated(probe):
            grads = micro_batch_gradients(probe, self.loss_fn, self.images, self.targets, self.micro_batches,
                                          self.mask)
            row['gradient_diversity'] = gradient_diversity(grads)
            row['gradient_confusion'] = gradient_confusion(grads)
            del grads
        with isolated(probe):
            n = self.coherence_examples
            row['gradient_coherence'] = gradient_coherence(per_example_gradients(
                probe, self.loss_fn, self.images[:n], self.targets[:n], self.mask))
        with isolated(probe):
            pooled = pooled_features(probe, self.images)
        row['dead_pooled_features'] = int((pooled.abs().amax(0) == 0).sum())
        norms = filter_norms(self.model)
        row['zeroed_filters'] = sum(count_zeroed_filters(norms).values())
        for name, values in norms.items():
            self.runlog.histogram(f'diagnostics/filter_norms/{name}', values.float().cpu(), global_step)
        for name in COLUMNS[2:]:
            self.runlog.scalar(f'diagnostics/{name}', row[name], global_step)
        _append_csv(self.csv, COLUMNS, [row])
        self._write_series(epoch, global_step, pooled)

    def _write_series(self, epoch: int, step: int, pooled: torch.Tensor) -> None:
        """Fig. 5's series: per-filter norms of the chosen layers, per-feature norms of the pooled features."""
        parameters = dict(self.model.named_parameters())
        series = {label: parameters[name].detach().flatten(1).norm(dim=1) for label, name in self.layers.items()}
        series['pooled'] = pooled.double().norm(dim=0)
        rows = []
        for label, values in series.items():
            values = values.double().cpu()
            self.runlog.histogram(f'diagnostics/fig5/{label}', values, step)
            self.runlog.scalar(f'diagnostics/fig5/{label}_zero', int((values < ZERO_FILTER_EPS).sum()), step)
            rows += [{'epoch': epoch, 'step': step, 'series': label, 'index': i, 'norm': v}
                     for i, v in enumerate(values.tolist())]
        _append_csv(self.series_csv, SERIES_COLUMNS, rows)


SERIES_COLUMNS = ('epoch', 'step', 'series', 'index', 'norm')


def _append_csv(path: Path, columns: tuple, rows: list[dict]) -> None:
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
