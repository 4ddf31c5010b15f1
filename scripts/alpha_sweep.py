#!/usr/bin/env python3
"""Fig. 6 of the arXiv paper from your own checkpoints trained at several alpha: logit norm against alpha, final
loss against alpha, and loss against logit norm with its regression line.

    python scripts/alpha_sweep.py --checkpoints runs/grid-*/last.pth --data-dir /imagenet --out figures/
    python scripts/alpha_sweep.py --json results/*.json --out figures/     # validate.py --json outputs

Each checkpoint is evaluated with validate.py (its JSON is kept next to the figures).
"""
from __future__ import annotations

import json
from pathlib import Path

from pgt.distributed import DistEnv
from pgt.errors import CliParser, UsageError, run_cli
from pgt.plots import alpha_sweep_figure, save_figure
from pgt.validate import evaluate_checkpoint, parse_args as validate_args


def parse_args(argv):
    p = CliParser(description=__doc__)
    p.add_argument('--checkpoints', nargs='*', default=[])
    p.add_argument('--json', nargs='*', default=[], help='validate.py --json outputs instead of checkpoints')
    p.add_argument('--data-dir', help='needed with --checkpoints')
    p.add_argument('--out', required=True)
    p.add_argument('--debug', action='store_true')
    return p.parse_args(argv)


def validate(checkpoint: str, data_dir: str) -> dict:
    """validate.py's evaluation of one checkpoint (its defaults: the checkpoint's own evaluation transform)."""
    return evaluate_checkpoint(validate_args(['--checkpoint', checkpoint, '--data-dir', data_dir]), DistEnv())


def main(argv) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoints and not args.data_dir:
        raise UsageError('--checkpoints needs --data-dir')
    results = [json.loads(Path(f).read_text()) for f in args.json]
    for i, checkpoint in enumerate(args.checkpoints):
        results.append(validate(checkpoint, args.data_dir))
        (out / f'validate-{i}.json').write_text(json.dumps(results[-1]))
    if len(results) < 2:
        raise UsageError('an alpha sweep needs at least two checkpoints or JSON files')
    fig, (slope, intercept, r2) = alpha_sweep_figure(results)
    for path in save_figure(fig, out / 'fig6-alpha-sweep'):
        print(path)
    print(f'loss = {slope:.4g} x logit norm + {intercept:.4g} (R^2 = {r2:.3f})')
    return 0


if __name__ == '__main__':
    run_cli(main)
