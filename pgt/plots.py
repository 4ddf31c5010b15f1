"""Figures of the papers from a suite's own runs: accuracy curves (Fig. 3) and logits/loss against alpha (Fig. 6)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_accuracy_curves(curves: dict, title: str, path: Path) -> Path:
    """Fig. 3: train and test top-1 per epoch for each labelled run ({label: summary rows})."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for label, rows in curves.items():
        epochs = [int(r['epoch']) for r in rows]
        axes[0].plot(epochs, [float(r['train_top1']) for r in rows], label=label)
        axes[1].plot(epochs, [float(r['eval_top1']) for r in rows], label=label)
    for ax, name in zip(axes, ('train top-1 (%)', 'test top-1 (%)')):
        ax.set_xlabel('epoch')
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_alpha_sweep(results: list[dict], out_dir: Path, prefix: str = 'fig6') -> list[Path]:
    """Fig. 6 from validate.py's JSON objects (each with pgt_alpha, logit_norm, loss): (a) logit norm against
    alpha, (b) final loss against alpha, (c) loss against logit norm with its least-squares line."""
    out_dir = Path(out_dir)
    points = sorted(((1.0 if r.get('pgt_alpha') is None else r['pgt_alpha'], r['logit_norm'], r['loss'])
                     for r in results))
    alpha, norm, loss = (np.array(v, dtype=float) for v in zip(*points))
    paths = []
    for name, x, y, xlabel, ylabel in (('logit_norm', alpha, norm, 'alpha', 'mean logit L2 norm'),
                                       ('loss', alpha, loss, 'alpha', 'validation loss')):
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(x, y, 'o-')
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        paths.append(out_dir / f'{prefix}-{name}-vs-alpha.png')
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    slope, intercept = np.polyfit(norm, loss, 1)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(norm, loss)
    grid = np.linspace(norm.min(), norm.max(), 50)
    ax.plot(grid, slope * grid + intercept, label=f'y = {slope:.5f} x + {intercept:.5f}')
    ax.set_xlabel('mean logit L2 norm')
    ax.set_ylabel('validation loss')
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out_dir / f'{prefix}-loss-vs-logit-norm.png')
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
