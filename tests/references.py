"""Independent float64 references used by the tests (never the code under test)."""
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
