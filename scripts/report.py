#!/usr/bin/env python3
"""The papers' tables and figures from this suite's runs, side by side with the published numbers.

    python scripts/report.py --runs runs/paper --out report/ [--validate-json runs/*/validate.json]

Reads <runs>/<row name>/summary.csv (finished or partial runs), writes report.md with one markdown table per paper
table (final train top-1, final and best test top-1, the paper's numbers, the difference to the baseline row and to
the paper), Fig. 3-style accuracy curves for every PGT row whose baseline also ran, and, given validate.py JSON
files of an alpha sweep, the three Fig. 6 plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pgt.config import parse_config  # noqa: E402
from pgt.errors import UsageError, run_cli  # noqa: E402
from pgt.paper import PaperRun, paper_runs  # noqa: E402
from pgt.plots import plot_accuracy_curves, plot_alpha_sweep  # noqa: E402
from pgt.runlog import read_summary  # noqa: E402

TITLES = {'1': 'Table 1: networks with batch normalisation', '2': 'Table 2: ResNet-18 without batch normalisation',
          '3': 'Table 3: ResNet-50, schedules and label smoothing', 'fig3c': 'Fig. 3(c): 60 epochs'}
COLUMNS = ('row', 'model', 'alpha', 'epochs', 'train top-1', 'test top-1', 'best test', 'paper train',
           'paper test', 'Δ baseline', 'Δ paper')


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--runs', required=True, help='folder holding one run directory per paper row')
    p.add_argument('--out', required=True, help='folder for report.md and the figures')
    p.add_argument('--validate-json', nargs='*', default=[], help="validate.py --json outputs of an alpha sweep")
    p.add_argument('--debug', action='store_true')
    return p.parse_args(argv)


def fmt(value, signed=False):
    if value is None:
        return '–'
    return f'{value:+.2f}' if signed else f'{value:.2f}'


def row_result(run: PaperRun, runs_dir: Path) -> dict | None:
    rows = read_summary(runs_dir / run.name)
    if not rows:
        return None
    used = runs_dir / run.name / 'config.yaml'  # what the run really used, which may override its recipe
    args = parse_config(['--config', str(used)]) if used.is_file() else run.args()
    return {'rows': rows, 'model': args.model, 'alpha': 1.0 if args.pgt_alpha is None else args.pgt_alpha,
            'train': float(rows[-1]['train_top1']), 'test': float(rows[-1]['eval_top1']),
            'best': max(float(r['eval_top1']) for r in rows)}


def table_markdown(table: str, runs: list[PaperRun], results: dict) -> str:
    lines = [f'## {TITLES.get(table, table)}', '', '| ' + ' | '.join(COLUMNS) + ' |',
             '|' + '---|' * len(COLUMNS)]
    for run in runs:
        result = results.get(run.name)
        if result is None:
            continue
        paper = run.paper
        baseline = results.get(paper.get('baseline'))
        delta_base = result['test'] - baseline['test'] if baseline and paper.get('baseline') != run.name else None
        delta_paper = result['test'] - float(paper['test_acc']) if 'test_acc' in paper else None
        cells = [run.name, result['model'], f"{result['alpha']:g}", str(len(result['rows'])), fmt(result['train']),
                 fmt(result['test']), fmt(result['best']), fmt(paper.get('train_acc')), fmt(paper.get('test_acc')),
                 fmt(delta_base, True), fmt(delta_paper, True)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def main(argv) -> int:
    args = parse_args(argv)
    runs_dir, out = Path(args.runs), Path(args.out)
    if not runs_dir.is_dir():
        raise UsageError(f'runs folder not found: {runs_dir}')
    out.mkdir(parents=True, exist_ok=True)
    sections, figures = ['# PGT reproduction report', ''], []
    for table in TITLES:
        runs = paper_runs(table)
        results = {run.name: r for run in runs if (r := row_result(run, runs_dir)) is not None}
        if not results:
            continue
        sections.append(table_markdown(table, runs, results))
        for run in runs:
            base = run.paper.get('baseline')
            if run.name in results and base in results and base != run.name:
                path = plot_accuracy_curves({base: results[base]['rows'], run.name: results[run.name]['rows']},
                                            f'{run.name} vs {base}', out / f'fig3-{run.name}.png')
                figures.append(path)
    if args.validate_json:
        sweep = [json.loads(Path(f).read_text()) for f in args.validate_json]
        if len(sweep) < 2:
            raise UsageError('an alpha sweep needs validate.py JSON of at least two checkpoints')
        figures += plot_alpha_sweep(sweep, out)
    if len(sections) == 2:
        raise UsageError(f'{runs_dir}: no run directory named after a paper row (e.g. resnet18-cosine-pgt)')
    sections += ['## Figures', ''] + [f'![{p.stem}]({p.name})' for p in figures]
    (out / 'report.md').write_text('\n'.join(sections) + '\n')
    print(f'wrote {out / "report.md"} and {len(figures)} figure(s)')
    return 0


if __name__ == '__main__':
    run_cli(main)
