"""The published implementation of PGT, reproduced: its backward hook's arithmetic (``--pgt-impl hook``), to tell
how much of a difference from the papers' numbers comes from it. pgt.transform is the exact transform.

The published code (the ``power_grad`` hook on the logits in its timm/models/resnet.py) receives the gradient g that
reaches the logits z [N, C] and returns, in g's dtype (float16 under its mixed precision):

    q   = (1 - s) one_hot(y) + s / C                       label-smoothed targets, s = --smoothing
    p~  = g / N + q                                         the "recovered" softmax
    p~' = p~^alpha / sum_j p~_j^alpha                        Eq. 5 applied to it
    g'  = (p~' - q) N

For cross-entropy averaged over the N images of a GPU and a loss scale S (the float16 gradient scaler's), the
incoming gradient is g = S (p - q) / N, so

    p~ = q + (S / N^2) (p - q).

p~ is the softmax p only when S = N^2 (the scaler's first scale, 2^16, at 256 images per GPU); then g' = S (p' - q) / N
and, unscaled, the exact PGT gradient (Eq. 6). Otherwise:

- S = N^2 / 2 (the scale after one overflow back-off): p~ = (p + q) / 2 is a distribution, so nothing fails, but
  g' = N (p~' - q) is about twice the exact S (p' - q) / N: the update is about twice as large until the scaler grows
  its scale back (2,000 steps later with PyTorch's defaults).
- S = 2 N^2: p~ = 2p - q, whose true-class entry 2 p_y - (1 - s + s / C) is negative wherever p_y is below about
  one half; a fractional power of it is NaN, the whole row's normaliser is NaN, the scaler finds non-finite
  gradients and skips the step (then halves S back to N^2).
- At any S the arithmetic runs in float16: g / N underflows for small probabilities, and p~^alpha of a tiny or zero
  entry is far from p^alpha (0^alpha = 0, where the exact p^alpha of a small p is not small for a small alpha).
- Without float16 (S = 1: float32 or bfloat16, no scaler), p~ = q + (p - q) / N^2. For one-hot targets every entry
  but the true class's is p_j / N^2, and a power scales them all alike, (p_j / N^2)^alpha = N^(-2 alpha) p_j^alpha:
  g' points the exact way but is about N^2 times too long (at N = 256, 2-7 x 10^4 times in
  scripts/hook_vs_exact.py): a learning rate that many times too large for every PGT step.

Only the baseline (alpha = 1) runs without the hook, as the published code ran its baselines (``--modify-softmax 0``).
The gradient that reaches the hook is cast to the logits' dtype as autocast casts it; the loss itself is the plain
(label-smoothed) cross-entropy in float32, as timm's losses computed it under autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .transform import _check_alpha


def published_hook(grad: torch.Tensor, target: torch.Tensor, alpha: float, smoothing: float) -> torch.Tensor:
    """The published hook on the gradient ``grad`` [N, C] of the logits, in ``grad``'s dtype (see the module's
    docstring for what it computes and where that differs from Eq. 6)."""
    n, classes = grad.shape
    q = F.one_hot(target, classes).to(grad.dtype)
    q = (1.0 - smoothing) * q + smoothing / classes
    recovered = grad / n + q
    powered = recovered ** alpha
    powered = powered / powered.sum(-1, keepdim=True)
    return (powered - q) * n


class _PublishedHook(torch.autograd.Function):
    """Identity in the forward pass; the published hook on the gradient in the backward pass."""

    @staticmethod
    def forward(ctx, logits, target, alpha, smoothing):
        ctx.save_for_backward(target)
        ctx.alpha, ctx.smoothing = alpha, smoothing
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        target, = ctx.saved_tensors
        return published_hook(grad, target, ctx.alpha, ctx.smoothing), None, None, None


class PublishedHookCrossEntropy(torch.nn.Module):
    """Cross-entropy (mean over the batch, label smoothing ``smoothing``) whose gradient passes the published hook
    when ``alpha`` < 1: the interface of pgt.transform.PowerGradCrossEntropy, for class-index targets only (the hook
    builds q from the class indices; mixup's soft targets never reached it)."""

    def __init__(self, alpha: float, smoothing: float = 0.0):
        super().__init__()
        self.alpha = _check_alpha(alpha)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() != 1:
            raise ValueError('the published hook takes class-index targets [N] (no mixup or cutmix)')
        if self.alpha != 1.0:
            logits = _PublishedHook.apply(logits, target, self.alpha, self.smoothing)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.smoothing)

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}, smoothing={self.smoothing}'
