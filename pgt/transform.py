"""The PowerGrad Transform (PGT) as an exact cross-entropy loss.

With logits z of shape [N, C], p = softmax(z) and a target distribution q (one-hot, label-smoothed or mixed), PGT keeps
the forward pass of cross-entropy, L = -sum_i q_i log p_i, and replaces the gradient reaching the logits (Eq. 6)

    dL/dz_i = p'_i - q_i,        p'_i = p_i^alpha / sum_j p_j^alpha        (Eq. 5),   0 <= alpha <= 1.

Because p_i^alpha = exp(alpha z_i) / (sum_k exp z_k)^alpha, the normaliser cancels and

    p'_i = exp(alpha z_i) / sum_j exp(alpha z_j) = softmax(alpha z)_i,

so p' is computed here from the logits with a stable log-sum-exp, in float32, whatever the autocast dtype.

Why not the published backward hook: it recovers p from the incoming gradient as ``grad / N + q``. The gradient that
reaches the logits of a mean-reduced loss under a loss scale S is S (p - q) / N, so the hook sees q + S (p - q) / N^2,
which is p only when S = N^2 (fp16 scaler's initial 2^16 at 256 images per GPU). Anywhere else it transforms the wrong
distribution or takes a fractional power of a negative number (NaN). This implementation never looks at the incoming
gradient's value except as the chain-rule factor, so it is exact for every S, N, reduction and precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    'power_grad_cross_entropy', 'PowerGradCrossEntropy', 'power_transform', 'stationary_threshold',
    'target_distribution',
]

_REDUCTIONS = ('mean', 'sum', 'none')
_SOFT_TARGET_TOLERANCE = 1e-3


def _check_alpha(alpha) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f'alpha must be a number in [0, 1], got {alpha!r}') from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f'alpha must be in [0, 1], got {alpha!r}')
    return value


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, smoothing: float, reduction: str, check_values: bool):
    if logits.dim() != 2:
        raise ValueError(f'logits must have shape [N, C], got shape {tuple(logits.shape)}')
    if reduction not in _REDUCTIONS:
        raise ValueError(f'reduction must be one of {_REDUCTIONS}, got {reduction!r}')
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f'smoothing must be in [0, 1), got {smoothing!r}')
    n, c = logits.shape
    if target.dim() == 1:
        if target.shape[0] != n:
            raise ValueError(f'target has shape {tuple(target.shape)}, expected [{n}] (class indices) for logits '
                             f'of shape {tuple(logits.shape)}')
        if target.is_floating_point():
            raise ValueError(f'target of shape [N] must hold integer class indices, got dtype {target.dtype}')
        if check_values and n > 0:
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= c:
                bad = low if low < 0 else high
                raise ValueError(f'target holds class index {bad}, outside [0, {c - 1}] for {c} classes')
    elif target.dim() == 2:
        if tuple(target.shape) != (n, c):
            raise ValueError(f'soft target has shape {tuple(target.shape)}, expected {(n, c)} like the logits')
        if check_values and n > 0:
            sums = target.double().sum(-1)
            worst = int((sums - 1).abs().argmax())
            if abs(float(sums[worst]) - 1) > _SOFT_TARGET_TOLERANCE:
                raise ValueError(f'soft target row {worst} sums to {float(sums[worst]):.6g}, expected 1 '
                                 f'(tolerance {_SOFT_TARGET_TOLERANCE})')
    else:
        raise ValueError(f'target must have shape [N] (indices) or [N, C] (probabilities), '
                         f'got shape {tuple(target.shape)}')


def target_distribution(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """q in float32: (1 - s) one_hot + s / C for class indices (timm's LabelSmoothingCrossEntropy), or the soft target.

    Built with an out-of-place scatter: F.one_hot synchronises with the host on CUDA to check the index range, and
    an in-place scatter would not vmap (per-example gradients in pgt.diagnostics).
    """
    if target.dim() == 2:
        return target.float()
    q = torch.full((target.shape[0], num_classes), smoothing / num_classes, device=target.device, dtype=torch.float32)
    return q.scatter_add(1, target.long().unsqueeze(1), torch.full_like(q[:, :1], 1.0 - smoothing))


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == 'mean':
        return per_sample.mean()
    if reduction == 'sum':
        return per_sample.sum()
    return per_sample


def _chain(grad: torch.Tensor, grad_output: torch.Tensor, reduction: str, dtype: torch.dtype,
           shift: float = 0.0) -> torch.Tensor:
    """k (grad + shift) in ``dtype``, in place on ``grad``; k is the incoming gradient of the reduced loss (1/N of it
    for 'mean') and stays a device tensor (no read back to the host). (A fused addcmul, or a multiplication written
    straight into a bfloat16 output, takes a CPU kernel's slow mixed path and costs more than these passes.)"""
    k = grad_output.float()
    if reduction == 'mean':
        k = k / grad.shape[-2]
    elif reduction == 'none':
        k = k.unsqueeze(-1)
    if shift:
        grad.add_(shift)
    return grad.mul_(k).to(dtype)


# Autograd functions come in two forms here. The ``setup_context`` form with ``generate_vmap_rule`` is what torch.func
# transforms need (per-example gradients with vmap in pgt.diagnostics); its ``apply`` binds arguments in Python and
# costs about 30 us more per call on a CPU than the classic ``forward(ctx, ...)`` form, half the cost of a whole
# cross-entropy on a small batch. The training step therefore takes the classic form, which torch.compile traces as
# well, and only code running under a torch.func transform takes the other. Both share the math below.

def _soft_forward(logits, q, reduction):
    return _reduce(-(q * torch.log_softmax(logits.float(), dim=-1)).sum(-1), reduction)


def _soft_backward(logits, q, alpha, reduction, grad_output):
    z = logits.float()
    grad = torch.softmax(z.mul_(alpha) if z is not logits else z * alpha, dim=-1).sub_(q)
    return _chain(grad, grad_output, reduction, logits.dtype)


def _indices_forward(logits, index, alpha, smoothing, reduction):
    """L_n = -(1 - s) log p_{n, y_n} - (s / C) sum_j log p_{n, j}, and alpha log p in float32 for the backward.

    softmax is unchanged by a constant added to a row, so softmax(alpha log p) = softmax(alpha z - alpha lse(z)) =
    softmax(alpha z): the backward's input is written over the log-probabilities once the loss is taken, and no
    second [N, C] buffer is allocated (on a CPU a fresh large buffer costs page faults, since freed large blocks go
    back to the operating system)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    per_sample = log_p.gather(-1, index).squeeze(-1).mul_(smoothing - 1.0)
    if smoothing:
        per_sample.sub_(log_p.mean(-1), alpha=smoothing)
    return _reduce(per_sample, reduction), log_p.mul_(alpha)


def _indices_backward(scaled, index, smoothing, reduction, dtype, grad_output):
    """dL_n/dz_n = softmax(alpha z_n) - q_n (Eq. 5-6): 1 - s taken at y_n (a scatter of N values), s / C everywhere
    (the shift of _chain)."""
    grad = torch.softmax(scaled, dim=-1)
    grad.scatter_add_(-1, index, torch.full(index.shape, smoothing - 1.0, dtype=grad.dtype, device=grad.device))
    return _chain(grad, grad_output, reduction, dtype, -smoothing / grad.shape[-1])


class _PowerGradCrossEntropy(torch.autograd.Function):
    """Soft targets q [N, C] (mixup/cutmix). Forward: L_n = -sum_i q_i log p_i. Backward: softmax(alpha z) - q
    (Eq. 5-6), times the incoming gradient, in float32. Saves the logits as they are and casts them again in the
    backward: mixup is not the hot path this suite's recipes take, so only the torch.func form exists."""
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, q, alpha, reduction):
        return _soft_forward(logits, q, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, q, alpha, reduction = inputs
        ctx.save_for_backward(logits, q)
        ctx.alpha, ctx.reduction = alpha, reduction

    @staticmethod
    def backward(ctx, grad_output):
        logits, q = ctx.saved_tensors
        return _soft_backward(logits, q, ctx.alpha, ctx.reduction, grad_output), None, None, None


class _PowerGradCrossEntropyIndices(torch.autograd.Function):
    """Class-index targets y [N] (as an [N, 1] int64 index) with label smoothing s; q = (1 - s) one_hot(y) + s / C
    is never materialised. Forward: one log-softmax and a gather; backward: one softmax of alpha log p (the forward's
    buffer, reused), a scatter of N values, the chain rule in place and one cast. Every pass over [N, C] runs in
    float32 whatever the autocast dtype. The classic form, for the training step."""

    @staticmethod
    def forward(ctx, logits, index, alpha, smoothing, reduction):
        loss, scaled = _indices_forward(logits, index, alpha, smoothing, reduction)
        ctx.save_for_backward(scaled, index)
        ctx.dtype, ctx.smoothing, ctx.reduction = logits.dtype, smoothing, reduction
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        scaled, index = ctx.saved_tensors
        grad = _indices_backward(scaled, index, ctx.smoothing, ctx.reduction, ctx.dtype, grad_output)
        return grad, None, None, None, None


class _PowerGradCrossEntropyIndicesFunc(torch.autograd.Function):
    """The same as _PowerGradCrossEntropyIndices in the form torch.func transforms accept: alpha log p leaves the
    forward as a second, non-differentiable output because this form may save only inputs and outputs."""
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, index, alpha, smoothing, reduction):
        return _indices_forward(logits, index, alpha, smoothing, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, index, alpha, smoothing, reduction = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], index)
        ctx.dtype, ctx.smoothing, ctx.reduction = logits.dtype, smoothing, reduction

    @staticmethod
    def backward(ctx, grad_output, _):
        scaled, index = ctx.saved_tensors
        grad = _indices_backward(scaled, index, ctx.smoothing, ctx.reduction, ctx.dtype, grad_output)
        return grad, None, None, None, None


def _under_torch_func() -> bool:
    """True inside vmap/grad/jacrev (torch's own test for choosing an autograd.Function's path; if a later torch
    drops it, the torch.func form, correct everywhere, is taken always)."""
    active = getattr(torch._C, '_are_functorch_transforms_active', None)
    return active is None or active()


def power_grad_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: float, smoothing: float = 0.0,
                             reduction: str = 'mean', check_targets: bool = True) -> torch.Tensor:
    """Cross-entropy whose gradient with respect to the logits is the PowerGrad one, p' - q (Eq. 5-6).

    Args:
        logits: [N, C] in any floating dtype (float16/bfloat16 under autocast included).
        target: [N] class indices, or [N, C] probabilities (mixup/cutmix output, already smoothed).
        alpha: the transform's exponent in [0, 1]; 1 is plain cross-entropy, 0 sends the uniform 1/C.
        smoothing: label smoothing for index targets, q = (1 - s) one_hot + s / C; ignored for soft targets.
        reduction: 'mean' (over the local batch: DDP then averages over ranks, giving the global mean), 'sum', 'none'.
        check_targets: check index range and soft-target sums. Each check reads a value back to the host, a
            synchronisation on CUDA and a graph break under torch.compile; a hot loop may turn it off.

    Returns the cross-entropy value in float32. The backward pass is computed in float32 from the logits and returned
    in the logits' dtype. alpha == 1 takes PyTorch's own cross-entropy, whose gradient is p - q.
    """
    alpha = _check_alpha(alpha)
    _check_inputs(logits, target, smoothing, reduction, check_targets)
    if alpha == 1.0:
        soft = target.dim() == 2
        return F.cross_entropy(logits.float(), target.float() if soft else target.long(), reduction=reduction,
                               label_smoothing=0.0 if soft else smoothing)
    if target.dim() == 2:
        return _PowerGradCrossEntropy.apply(logits, target.float(), alpha, reduction)
    index = target.long().unsqueeze(-1)
    if _under_torch_func():
        return _PowerGradCrossEntropyIndicesFunc.apply(logits, index, alpha, smoothing, reduction)[0]
    return _PowerGradCrossEntropyIndices.apply(logits, index, alpha, smoothing, reduction)


class PowerGradCrossEntropy(torch.nn.Module):
    """Module form of :func:`power_grad_cross_entropy`; ``alpha`` may change between steps (--pgt-start-epoch)."""

    def __init__(self, alpha: float, smoothing: float = 0.0, reduction: str = 'mean', check_targets: bool = True):
        super().__init__()
        self.alpha = _check_alpha(alpha)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f'smoothing must be in [0, 1), got {smoothing!r}')
        self.smoothing = smoothing
        self.reduction = reduction
        self.check_targets = check_targets

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return power_grad_cross_entropy(logits, target, self.alpha, self.smoothing, self.reduction,
                                        self.check_targets)

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}, smoothing={self.smoothing}, reduction={self.reduction!r}'


def power_transform(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 5 on probabilities: p'_i = p_i^alpha / sum_j p_j^alpha along the last dimension."""
    alpha = _check_alpha(alpha)
    powered = p.pow(alpha)
    return powered / powered.sum(-1, keepdim=True)


def stationary_threshold(p: torch.Tensor, alpha: float) -> torch.Tensor:
    """Lemma 1 (Eq. 7): t = (sum_j p_j^alpha)^(1 / (alpha - 1)); p_i > t shrinks under Eq. 5, p_i < t grows.

    At alpha = 1 every value is stationary and the formula is 0/0; its limit, exp(sum_j p_j log p_j) = exp(-H(p)),
    is returned there so that the threshold is continuous in alpha (Theorem 1).

    Near alpha = 1 the direct formula raises a number within rounding of 1 to a huge power. Written as
    log t = log1p(sum_j (p_j^alpha - p_j)) / (alpha - 1) with p_j^alpha - p_j = p_j expm1((alpha - 1) log p_j)
    (using sum_j p_j = 1) it keeps full precision for every alpha.
    """
    alpha = _check_alpha(alpha)
    if alpha == 1.0:
        return torch.exp(torch.special.xlogy(p, p).sum(-1))
    excess = torch.where(p > 0, p * torch.expm1((alpha - 1.0) * torch.log(p)), p.pow(alpha))
    return torch.exp(torch.log1p(excess.sum(-1)) / (alpha - 1.0))

