#!/usr/bin/env python3
"""How far the published hook's PGT gradient (--pgt-impl hook) is from the exact one, by loss scale and alpha.

    python scripts/hook_vs_exact.py                          # N = 256 images per GPU, 1,000 classes
    python scripts/hook_vs_exact.py --batch 128 --alphas 0.25 0.3 --json out.json

Logits of a network part-way through training are simulated: N(0, spread^2) for every class, the true class ahead
by margin + N(0, (margin / 2)^2), so that the true class's probability spreads over (0, 1) across the batch. For each
loss scale S (the float16 gradient scaler's; 1 is float32 or bfloat16) the incoming float16 gradient S (p - q) / N
goes through the published hook (pgt.published_hook), and the result, divided by S, is compared row by row with the
exact transform's gradient (p' - q) / N (pgt.transform, float32). S = 1 is taken in float32 (no scaler):

- norm ratio: ||hook row|| / ||exact row||, median and range over the rows that are finite;
- cosine: the smallest cosine similarity between a hook row and its exact row (1: the same direction);
- NaN rows: the share of rows that the hook turns into NaN (any one makes the scaler skip the whole step).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgt.errors import CliParser, run_cli  # noqa: E402
from pgt.published_hook import published_hook  # noqa: E402
from pgt.transform import PowerGradCrossEntropy  # noqa: E402


def parse_args(argv):
    p = CliParser(description=__doc__)
    p.add_argument('--batch', type=int, default=256, help='images per GPU (N)')
    p.add_argument('--classes', type=int, default=1000)
    p.add_argument('--alphas', type=float, nargs='+', default=[0.05, 0.25, 0.3])
    p.add_argument('--smoothing', type=float, default=0.0)
    p.add_argument('--spread', type=float, default=2.0, help='standard deviation of the logits')
    p.add_argument('--margin', type=float, default=6.0, help="the true class's mean lead")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', help='also write the rows here')
    p.add_argument('--debug', action='store_true')
    return p.parse_args(argv)


def simulated_logits(args) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.randint(0, args.classes, (args.batch,), generator=generator)
    logits = args.spread * torch.randn(args.batch, args.classes, generator=generator, dtype=torch.float64)
    lead = args.margin + args.margin / 2 * torch.randn(args.batch, generator=generator, dtype=torch.float64)
    logits[torch.arange(args.batch), labels] += lead
    return logits, labels


def exact_gradient(logits, labels, alpha: float, smoothing: float) -> torch.Tensor:
    """(p' - q) / N of the mean loss, from the exact transform."""
    leaf = logits.float().requires_grad_(True)
    PowerGradCrossEntropy(alpha, smoothing)(leaf, labels).backward()
    return leaf.grad.double()


def compare(logits, labels, alpha: float, scale: float, smoothing: float) -> dict:
    n, classes = logits.shape
    q = (1 - smoothing) * torch.nn.functional.one_hot(labels, classes).double() + smoothing / classes
    dtype = torch.float32 if scale == 1 else torch.float16  # no scaler: float32 (bfloat16 gives the same figures)
    incoming = (scale * (torch.softmax(logits, -1) - q) / n).to(dtype)  # as autocast hands it to the hook
    hooked = published_hook(incoming, labels, alpha, smoothing).double() / scale
    exact = exact_gradient(logits, labels, alpha, smoothing)
    finite = hooked.isfinite().all(-1)
    hooked, exact = hooked[finite], exact[finite]
    ratios = hooked.norm(dim=-1) / exact.norm(dim=-1)
    cosines = (hooked * exact).sum(-1) / (hooked.norm(dim=-1) * exact.norm(dim=-1))
    row = {'alpha': alpha, 'scale': scale, 'scale_over_n2': scale / n ** 2,
           'nan_rows': 1 - finite.double().mean().item()}
    if finite.any():
        row.update(ratio_median=ratios.median().item(), ratio_min=ratios.min().item(), ratio_max=ratios.max().item(),
                   cosine_min=cosines.min().item())
    return row


def main(argv) -> int:
    args = parse_args(argv)
    logits, labels = simulated_logits(args)
    n2 = args.batch ** 2
    p_true = torch.softmax(logits, -1)[torch.arange(args.batch), labels]
    print(f'N = {args.batch}, C = {args.classes}, smoothing {args.smoothing}; true-class probability: median '
          f'{p_true.median():.3f}, {100 * (p_true < 0.5).double().mean():.0f}% of rows below 0.5')
    rows = []
    for alpha in args.alphas:
        for scale in (1.0, n2 / 2, n2, 2 * n2):
            row = compare(logits, labels, alpha, scale, args.smoothing)
            rows.append(row)
            label = 'S = 1' if scale == 1 else f'S = 2^{math.log2(scale):g}'
            ratios = (f'norm ratio median {row["ratio_median"]:.4g} (rows {row["ratio_min"]:.4g} to '
                      f'{row["ratio_max"]:.4g}), cosine >= {row["cosine_min"]:.4f}' if 'ratio_median' in row
                      else 'no finite row')
            print(f'alpha {alpha:g}, {label} ({row["scale_over_n2"]:g} N^2): {ratios}, NaN rows '
                  f'{100 * row["nan_rows"]:.0f}%')
    if args.json:
        Path(args.json).write_text(json.dumps({'argv': argv, 'rows': rows}, indent=1))
    return 0


if __name__ == '__main__':
    run_cli(main)
