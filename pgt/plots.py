"""The papers' figures from this suite's runs, drawn for a paper: panels labelled (a), (b), ... as in the papers,
integer epochs, legends outside the data, published results as reference lines, saved as PNG (200 dpi) and PDF.

- Fig. 2 (ICLR): train and test top-1 and the generalisation gap (train - test) against alpha, a panel per model.
- Fig. 3: train and test top-1 per epoch on log-log axes, as the papers draw them, the mean over seeds with a band of
  one standard deviation.
- Fig. 4: the filters of the second weight layer at the end of training, each a cell coloured by its L2 norm,
  those that zeroed out marked: a zero filter gives a zero feature map for every input (the papers' Fig. 4 shows
  such maps); a panel per run.
- Fig. 5: per-filter L2 norms of two weight layers and per-feature norms of the pooled features over iterations,
  for a baseline and a PGT run (pgt.diagnostics' filter_norms.csv).
- Fig. 6: logit norm and loss against alpha, and loss against logit norm with its least-squares line and R^2.

Each ``*_figure`` function returns the matplotlib Figure (so that its axes, labels and legends can be inspected);
``save_figure`` writes it.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter  # noqa: E402

DPI = 200
PANELS = 'abcdefghij'


def save_figure(fig, stem: Path) -> list[Path]:
    """Write ``fig`` as <stem>.png (200 dpi) and <stem>.pdf; returns both paths."""
    paths = [Path(f'{stem}.png'), Path(f'{stem}.pdf')]
    for path in paths:
        fig.savefig(path, dpi=DPI, bbox_inches='tight')
    plt.close(fig)
    return paths


def _label_panels(axes, first: int = 0) -> None:
    for i, ax in enumerate(axes):
        ax.set_title(f'({PANELS[first + i]})', loc='left', fontweight='bold')


def _integer_log_axis(ax, last: int) -> None:
    """The papers' log axis of epochs, with the epochs numbered from 0 as summary.csv numbers them: symmetric-log
    (linear from 0 to 1, logarithmic beyond), integer tick labels 0, 1, 2, 5, 10, 20, 50, ..."""
    ax.set_xscale('symlog', linthresh=1.0, linscale=0.5)
    ticks = [t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= max(last, 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _mean_and_band(runs: list[list[dict]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epochs, mean, std) over seeds, on the epochs that every seed has reached."""
    length = min(len(rows) for rows in runs)
    values = np.array([[float(r[key]) for r in rows[:length]] for rows in runs])
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(length)
    return np.array([int(r['epoch']) for r in runs[0][:length]]), values.mean(axis=0), std


def accuracy_curves_figure(curves: dict[str, list[list[dict]]], title: str,
                           published: dict[str, dict] | None = None):
    """Fig. 3: (a) train and (b) test top-1 per epoch for each labelled row ({label: [summary rows of each seed]}),
    with the row's published final train and test top-1 as dashed lines ({label: {'train_acc', 'test_acc'}})."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout='constrained')
    published = published or {}
    last = 1
    for color, (label, runs) in zip(plt.rcParams['axes.prop_cycle'].by_key()['color'], curves.items()):
        for ax, key, paper_key in ((axes[0], 'train_top1', 'train_acc'), (axes[1], 'eval_top1', 'test_acc')):
            epochs, mean, std = _mean_and_band(runs, key)
            last = max(last, int(epochs[-1]))
            seeds = f' ({len(runs)} seeds)' if len(runs) > 1 else ''
            ax.plot(epochs, mean, color=color, label=f'{label}{seeds}')
            if len(runs) > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            value = published.get(label, {}).get(paper_key)
            if value is not None:
                ax.axhline(float(value), color=color, linestyle='--', linewidth=1, label=f'{label}: published')
    for ax, name in zip(axes, ('train top-1 (%)', 'test top-1 (%)')):
        _integer_log_axis(ax, last)
        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel('epoch')
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which='both')
    _label_panels(axes)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc='outside lower center', ncol=2, frameon=False)
    fig.suptitle(title)
    return fig


def grid_figure(grids: dict[str, list[tuple[float, float, float]]]):
    """Fig. 2: for each model ({title: [(alpha, train top-1, test top-1)]}), train and test top-1 against alpha and,
    on the right axis, the gap train - test."""
    fig, axes = plt.subplots(1, len(grids), figsize=(5 * len(grids), 4), layout='constrained', squeeze=False)
    axes = axes[0]
    for ax, (title, points) in zip(axes, grids.items()):
        alpha, train, test = (np.array(v, dtype=float) for v in zip(*sorted(points)))
        ax.plot(alpha, train, 'o-', label='train top-1')
        ax.plot(alpha, test, 's-', label='test top-1')
        gap_ax = ax.twinx()
        gap_ax.plot(alpha, train - test, '^:', color='tab:gray', label='gap (train - test)')
        gap_ax.set_ylabel('generalisation gap (points)')
        ax.set_xlabel('alpha')
        ax.set_ylabel('top-1 (%)')
        ax.set_xticks(alpha, [f'{a:g}' for a in alpha], rotation=45)
        ax.grid(alpha=0.3)
        ax.text(0.98, 0.02, title, transform=ax.transAxes, ha='right', va='bottom')
    _label_panels(axes)
    handles = axes[0].get_legend_handles_labels()[0] + axes[0].figure.axes[len(grids)].get_legend_handles_labels()[0]
    fig.legend(handles, [h.get_label() for h in handles], loc='outside lower center', ncol=3, frameon=False)
    return fig


def filter_norms_figure(runs: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]):
    """Fig. 5: a row per run ({label: {series: (steps [T], norms [T, filters])}}), a column per series (the two
    layers, the pooled features); each line is one filter or feature."""
    labels = list(runs)
    series = list(next(iter(runs.values())))
    fig, axes = plt.subplots(len(labels), len(series), figsize=(4 * len(series), 3 * len(labels)),
                             layout='constrained', squeeze=False)
    for row, label in enumerate(labels):
        for col, name in enumerate(series):
            ax = axes[row][col]
            steps, norms = runs[label][name]
            ax.plot(steps, norms, linewidth=0.6)
            ax.set_xlabel('iteration')
            ax.set_ylabel('pooled feature norm' if name == 'pooled' else f'{name} filter norm')
            ax.text(0.98, 0.95, label, transform=ax.transAxes, ha='right', va='top')
            ax.grid(alpha=0.3)
    _label_panels([ax for row in axes for ax in row])
    return fig


def alpha_sweep_figure(results: list[dict]):
    """Fig. 6 from validate.py's JSON objects (each with pgt_alpha, logit_norm, loss): (a) logit norm against alpha,
    (b) final loss against alpha, (c) loss against logit norm with its least-squares line and R^2, each point
    labelled with its alpha. Returns (figure, (slope, intercept, r2))."""
    points = sorted(((1.0 if r.get('pgt_alpha') is None else r['pgt_alpha'], r['logit_norm'], r['loss'])
                     for r in results))
    alpha, norm, loss = (np.array(v, dtype=float) for v in zip(*points))
    slope, intercept = np.polyfit(norm, loss, 1)
    residual = loss - (slope * norm + intercept)
    r2 = 1 - float(residual @ residual) / float(((loss - loss.mean()) ** 2).sum())
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout='constrained')
    for ax, y, name in ((axes[0], norm, 'mean logit L2 norm'), (axes[1], loss, 'validation loss')):
        ax.plot(alpha, y, 'o-')
        ax.set_xlabel('alpha')
        ax.set_ylabel(name)
    axes[2].scatter(norm, loss)
    for a, x, y in zip(alpha, norm, loss):
        axes[2].annotate(f'α={a:g}', (x, y), textcoords='offset points', xytext=(4, 4), fontsize=8)
    line = np.linspace(norm.min(), norm.max(), 50)
    axes[2].plot(line, slope * line + intercept, label=f'y = {slope:.4g} x + {intercept:.4g} (R² = {r2:.3f})')
    axes[2].set_xlabel('mean logit L2 norm')
    axes[2].set_ylabel('validation loss')
    for ax in axes:
        ax.grid(alpha=0.3)
    _label_panels(axes)
    fig.legend(loc='outside lower center', frameon=False)
    return fig, (float(slope), float(intercept), r2)


def zeroed_filters_figure(runs: dict[str, np.ndarray], layer: str, eps: float):
    """Fig. 4: a panel per run ({label: per-filter L2 norms [filters]}), the filters laid out on a grid and coloured
    by their norm on one scale; a filter below ``eps`` (zeroed out) is marked with a cross and counted."""
    count = len(next(iter(runs.values())))
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    top = max(float(norms.max()) for norms in runs.values()) or 1.0
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4), layout='constrained', squeeze=False)
    axes = axes[0]
    for ax, (label, norms) in zip(axes, runs.items()):
        grid = np.full(rows * columns, np.nan)
        grid[:count] = norms
        image = ax.imshow(grid.reshape(rows, columns), cmap='viridis', vmin=0.0, vmax=top)
        zeroed = np.flatnonzero(norms < eps)
        ax.scatter(zeroed % columns, zeroed // columns, marker='x', color='tab:red', s=30,
                   label='zeroed-out filter')
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f'{label}: {len(zeroed)} of {count} filters zeroed out')
    _label_panels(axes)
    fig.colorbar(image, ax=list(axes), label=f'{layer}: filter L2 norm')
    fig.suptitle(f'Filters of {layer} at the end of training')
    return fig
