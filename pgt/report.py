"""The papers' tables and figures from this suite's runs, with their uncertainty, side by side with the published
numbers.

    pgt-report --runs runs/paper --out report/ [--validate-json sweep/*.json]
    pgt-report --runs runs/budget --tier budget --out report-budget/
    pgt-report --runs runs/smoke-20261204-101500 --out report-smoke/       # any run, or a folder of runs
    pgt-report --runs runs/paper --out report/ --published-run resnet18-cosine-pgt=published/cosine-alpha-0.25

(``python scripts/report.py`` is the same program.) Reads the run directories that pgt-reproduce writes
(<runs>/<row>/summary.csv, and <runs>/<row>/seed<k>/summary.csv for repeated seeds), and any other run directory
there (or --runs itself, when it is one run), and writes:

- report.md: per table, the rows' setup (transform implementation, schedule origin, peak learning rate), final train
  top-1, final and best test top-1 (mean and standard deviation over seeds), final test top-5 and loss, the
  generalisation gap (train - test) and the published numbers, with the best test top-1's difference to the paper's
  (the published code kept its best checkpoint); then each PGT row against its baseline: the difference in train and
  test top-1 with a 95% confidence interval (paired by seed when both rows have the same seeds, Welch's otherwise;
  pgt.stats) and whether the published difference lies inside it. A row with one seed has no interval. Rows whose
  runs are incomplete (fewer epochs than the recipe) or not on ImageNet-1k's 1,000 classes say so, and get no
  difference to the paper and no verdict on it. The grid searches get a table per model. Runs not named after a row
  of the tier get a table of their own, without the paper's numbers. Runs of the published code (--published-run
  ROW=DIR: its own args.yaml and summary.csv) get a table beside their rows. Runs with diagnostics get the thesis'
  gradient-conditioning measures. Three decimals, as the papers print.
- results.csv, differences.csv (and published_runs.csv): the same numbers at full precision.
- figures (PNG and PDF), all from the runs' own files: Fig. 2 (top-1 against alpha) and Fig. 6 (logit norm and loss
  against alpha, from each run's last evaluation) for every group of runs that differ in alpha alone; Fig. 3 curves
  for every PGT row whose baseline ran and for every other run; Fig. 4 (the second weight layer's zeroed-out
  filters, from last.pth); Fig. 5 for runs with diagnostics' filter_norms.csv; and Fig. 6 also from validate.py JSON
  files (--validate-json), when given.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from .errors import CliParser, UsageError, run_cli
from .optim import total_epochs
from .paper import TABLES, PaperRun, experiments, paper_runs, seed_runs
from .diagnostics import ZERO_FILTER_EPS, weight_layers
from .plots import (accuracy_curves_figure, alpha_sweep_figure, filter_norms_figure, grid_figure, save_figure,
                    zeroed_filters_figure)
from .runlog import read_summary
from .stats import difference, summarize

OTHER = 'other'  # the table of runs that are not rows of the tier
TITLES = {'1': 'Table 1: networks with batch normalisation', '2': 'Table 2: ResNet-18 without batch normalisation',
          '3': 'Table 3: ResNet-50, schedules and label smoothing', 'fig3c': 'Fig. 3(c): 60 epochs',
          'grid': 'Grid searches (ICLR Sec. 3.1)', 'extended': 'Grid searches beyond the paper',
          'cifar': 'ResNet-20 on CIFAR-10 (ICLR Fig. 2c)', OTHER: 'Other runs'}
GRID_TABLES = ('grid', 'extended', 'cifar')
SETUP_NOTE = ('"setup" is where a run may differ from the published code: the transform (exact: Eq. 5-6 from the '
              'logits; hook: the published backward hook), the schedule origin (timm: epoch k at the rate for k; fork: '
              'at the rate for k + 1, as the published loop ran) and the peak learning rate.')
DELTA_NOTE = ('Δ paper compares the best test top-1 with the paper\'s, as the published code kept its best '
              'checkpoint.')


def parse_args(argv):
    p = CliParser(description=__doc__)
    p.add_argument('--runs', required=True, help='folder holding one run directory per row (pgt-reproduce --runs-dir)')
    p.add_argument('--out', required=True, help='folder for report.md, the CSVs and the figures')
    p.add_argument('--tier', default='paper', choices=('paper', 'budget'))
    p.add_argument('--validate-json', nargs='*', default=[], help='validate.py --json outputs of an alpha sweep')
    p.add_argument('--published-run', nargs='*', default=[], metavar='ROW=DIR',
                   help="a run folder of the published code (its args.yaml and summary.csv) to set beside ROW")
    p.add_argument('--debug', action='store_true')
    return p.parse_args(argv)


@dataclass
class RowResult:
    """A row's runs: {seed: summary rows} from its experiment's run directories."""
    run: PaperRun
    source: str  # the run directory's name (the experiment's first row)
    seeds: dict[int, list[dict]]
    model: str
    alpha: float
    planned_epochs: int
    classes: int | None
    expected_classes: int | None  # None: a run that is not a row of the papers
    dirs: dict[int, Path]  # {seed: run directory}
    config: dict  # the first seed's config.yaml

    @property
    def setup(self) -> str:
        """How it was trained where the published code differs: transform, schedule origin, peak lr."""
        lr = self.config.get('lr')
        return (f"{self.config.get('pgt_impl', 'exact')}, {self.config.get('schedule_origin', 'timm')}"
                + (f', lr {lr:g}' if isinstance(lr, (int, float)) else ''))

    def final(self, key: str) -> dict[int, float]:
        return {seed: float(rows[-1][key]) for seed, rows in self.seeds.items()}

    def best(self, key: str) -> dict[int, float]:
        return {seed: max(float(r[key]) for r in rows) for seed, rows in self.seeds.items()}

    def final_mean(self, key: str) -> float | None:
        """The mean over seeds of the last epoch's ``key``; None where a summary lacks the column."""
        if not all(rows[-1].get(key) not in (None, '') for rows in self.seeds.values()):
            return None
        return summarize(list(self.final(key).values())).mean

    @property
    def first_dir(self) -> Path:
        return self.dirs[min(self.dirs)]

    @property
    def epochs_done(self) -> int:
        return min(len(rows) for rows in self.seeds.values())

    @property
    def status(self) -> str:
        """'complete', or every reason the row cannot be compared with the paper."""
        reasons = []
        if self.epochs_done < self.planned_epochs:
            reasons.append(f'incomplete: {self.epochs_done} of {self.planned_epochs} epochs')
        if self.expected_classes and self.classes is not None and self.classes != self.expected_classes:
            reasons.append(f'not the paper\'s data: {self.classes} classes, not {self.expected_classes}')
        if self.run.table == OTHER:
            reasons.append('not a row of the papers: no comparison')
        return '; '.join(reasons) or 'complete'


def row_result(run: PaperRun, source: str, dirs: dict[int, Path], expected_classes: int | None) -> RowResult:
    """A row's result from its seeds' run directories ({seed: folder}); its planned length from its recipe."""
    config = yaml.safe_load((dirs[min(dirs)] / 'config.yaml').read_text()) or {}
    return RowResult(run, source, {seed: read_summary(folder) for seed, folder in dirs.items()},
                     config.get('model', '?'), 1.0 if config.get('pgt_alpha') is None else float(config['pgt_alpha']),
                     total_epochs(run.args()), config.get('num_classes'), expected_classes, dirs, config)


def collect(runs: list[PaperRun], runs_dir: Path) -> dict[str, RowResult]:
    """Every row that has at least one seed with a summary, each filled from its experiment's run directories."""
    results = {}
    for group in experiments(runs):
        dirs = seed_runs(runs_dir, group[0].name)
        if dirs:
            classes = 10 if group[0].args().dataset == 'cifar10' else 1000
            results.update({run.name: row_result(run, group[0].name, dirs, classes) for run in group})
    return results


def collect_others(runs_dir: Path, rows: set[str]) -> dict[str, RowResult]:
    """The runs under ``runs_dir`` (or ``runs_dir`` itself, when it is one) that are not named after a row: each
    with its seeds, its planned length from its own config.yaml, and no paper to compare with."""
    if seed_runs(runs_dir.parent, runs_dir.name):
        candidates = [runs_dir]
    else:
        candidates = [folder for folder in sorted(runs_dir.iterdir()) if folder.is_dir() and folder.name not in rows]
    results = {}
    for folder in candidates:
        dirs = seed_runs(folder.parent, folder.name)
        if dirs:
            run = PaperRun(folder.name, next(iter(dirs.values())) / 'config.yaml', OTHER)
            results[folder.name] = row_result(run, folder.name, dirs, None)
    return results


def fmt(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '–'
    return f'{value:+.3f}' if signed else f'{value:.3f}'


def spread(values: dict[int, float]) -> str:
    s = summarize(list(values.values()))
    return fmt(s.mean) if s.n < 2 else f'{fmt(s.mean)} ± {fmt(s.std)}'


def paper_value(run: PaperRun, key: str) -> float | None:
    return float(run.paper[key]) if run.paper.get(key) is not None else None


def result_row(result: RowResult) -> dict:
    """results.csv's row of a table row: full-precision means and standard deviations over seeds."""
    train, test, best = (summarize(list(v.values())) for v in (
        result.final('train_top1'), result.final('eval_top1'), result.best('eval_top1')))
    paper_train, paper_test = paper_value(result.run, 'train_acc'), paper_value(result.run, 'test_acc')
    complete = result.status == 'complete'
    return {'table': result.run.table, 'row': result.run.name, 'run': result.source, 'model': result.model,
            'alpha': result.alpha, 'setup': result.setup, 'seeds': ' '.join(map(str, sorted(result.seeds))),
            'n_seeds': len(result.seeds), 'epochs_done': result.epochs_done, 'epochs_planned': result.planned_epochs,
            'status': result.status, 'train_top1_mean': train.mean, 'train_top1_std': train.std,
            'test_top1_mean': test.mean, 'test_top1_std': test.std, 'best_test_top1_mean': best.mean,
            'best_test_top1_std': best.std, 'test_top5_mean': result.final_mean('eval_top5'),
            'test_loss_mean': result.final_mean('eval_loss'), 'gap_mean': train.mean - test.mean,
            'paper_train': paper_train, 'paper_test': paper_test,
            'paper_gap': paper_train - paper_test if paper_train is not None and paper_test is not None else None,
            'paper_test_loss': paper_value(result.run, 'test_loss'),
            # The published code kept model_best (by test top-1) and its README reports those: best against best.
            'delta_paper_best_test': best.mean - paper_test if complete and paper_test is not None else None}


def difference_row(result: RowResult, baseline: RowResult, baselines_paper: PaperRun | None) -> dict:
    """differences.csv's row of a PGT row: PGT - baseline in test and train top-1, with 95% intervals."""
    test = difference(result.final('eval_top1'), baseline.final('eval_top1'))
    train = difference(result.final('train_top1'), baseline.final('train_top1'))
    published = None
    if baselines_paper is not None and paper_value(result.run, 'test_acc') is not None:
        base_test = paper_value(baselines_paper, 'test_acc')
        published = paper_value(result.run, 'test_acc') - base_test if base_test is not None else None
    comparable = result.status == baseline.status == 'complete'  # no verdict on incomplete or reduced runs
    return {'table': result.run.table, 'row': result.run.name, 'baseline': baseline.run.name, 'method': test.method,
            'n_pgt': len(result.seeds), 'n_baseline': len(baseline.seeds), 'delta_test': test.estimate,
            'delta_test_low': test.low, 'delta_test_high': test.high, 'delta_train': train.estimate,
            'delta_train_low': train.low, 'delta_train_high': train.high, 'published_delta_test': published,
            'published_inside': test.contains(published) if comparable and published is not None else None}


def interval_text(row: dict, key: str) -> str:
    low, high = row[f'{key}_low'], row[f'{key}_high']
    if math.isnan(low):
        return f'{fmt(row[key], True)} (one seed: no interval)'
    return f'{fmt(row[key], True)} [{fmt(low, True)}, {fmt(high, True)}]'


def results_markdown(title: str, rows: list[dict], results: dict[str, RowResult], with_paper: bool) -> list[str]:
    columns = ['row', 'model', 'α', 'setup', 'seeds', 'epochs', 'train top-1', 'test top-1', 'best test',
               'test top-5', 'test loss', 'gap']
    if with_paper:
        columns += ['paper train', 'paper test', 'paper gap', 'Δ paper (best test)']
    lines = [f'## {title}', '', '| ' + ' | '.join(columns + ['status']) + ' |', '|' + '---|' * (len(columns) + 1)]
    for row in rows:
        result = results[row['row']]
        loss = fmt(row['test_loss_mean']) + (f" (paper {fmt(row['paper_test_loss'])})"
                                             if with_paper and row['paper_test_loss'] is not None else '')
        cells = [row['row'], row['model'], f"{row['alpha']:g}", row['setup'], row['seeds'] or '–',
                 f"{row['epochs_done']}/{row['epochs_planned']}", spread(result.final('train_top1')),
                 spread(result.final('eval_top1')), spread(result.best('eval_top1')), fmt(row['test_top5_mean']),
                 loss, fmt(row['gap_mean'])]
        if with_paper:
            cells += [fmt(row['paper_train']), fmt(row['paper_test']), fmt(row['paper_gap']),
                      fmt(row['delta_paper_best_test'], True)]
        lines.append('| ' + ' | '.join(cells + [row['status']]) + ' |')
    return lines + ['']


def differences_markdown(rows: list[dict], tier: str) -> list[str]:
    if not rows:
        return []
    columns = ['row', 'baseline', 'seeds (PGT, baseline)', 'Δ train', 'Δ test [95% CI]', 'interval']
    if tier == 'paper':
        columns += ['published Δ test', 'published Δ inside the CI?']
    lines = ['PGT against its baseline (PGT - baseline, top-1 points; 95% confidence interval over seeds):', '',
             '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        inside = {True: 'inside', False: 'outside', None: '–'}[row['published_inside']]
        cells = [row['row'], row['baseline'], f"{row['n_pgt']}, {row['n_baseline']}", fmt(row['delta_train'], True),
                 interval_text(row, 'delta_test'),
                 {'paired': 'paired by seed', 'Welch': "Welch's t", 'one seed': 'none (one seed)'}[row['method']]]
        if tier == 'paper':
            cells += [fmt(row['published_delta_test'], True), inside]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines + ['']


def grid_markdown(title: str, results: dict[str, RowResult], runs: list[PaperRun]) -> list[str]:
    """A table per grid recipe: alpha against train, test and gap (Fig. 2 is drawn from every run, alpha_figures)."""
    lines = [f'## {title}', '']
    for recipe in dict.fromkeys(run.recipe for run in runs):
        found = [results[r.name] for r in runs if r.recipe == recipe and r.name in results]
        if not found:
            continue
        lines += [f'### {recipe.stem}', '', '| run | α | setup | seeds | train top-1 | test top-1 | gap | status |',
                  '|---|---|---|---|---|---|---|---|']
        for result in found:
            train = summarize(list(result.final('train_top1').values()))
            test = summarize(list(result.final('eval_top1').values()))
            lines.append(f'| {result.run.name} | {result.alpha:g} | {result.setup} | {len(result.seeds)} | '
                         f'{spread(result.final("train_top1"))} | {spread(result.final("eval_top1"))} | '
                         f'{fmt(train.mean - test.mean)} | {result.status} |')
        lines.append('')
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    if rows:
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def series(run_dir: Path) -> dict | None:
    """Fig. 5's series of a run ({series: (steps, norms [steps, index])}) from its filter_norms.csv."""
    path = run_dir / 'filter_norms.csv'
    if not path.is_file():
        return None
    table: dict[str, dict[int, dict[int, float]]] = {}
    with open(path, newline='') as f:
        for r in csv.DictReader(f):
            table.setdefault(r['series'], {}).setdefault(int(r['step']), {})[int(r['index'])] = float(r['norm'])
    return {name: (np.array(sorted(steps)), np.array([[steps[s][i] for i in sorted(steps[s])] for s in sorted(steps)]))
            for name, steps in table.items()}


def figures_for_table(runs: list[PaperRun], results: dict[str, RowResult], every: dict[str, RowResult],
                      out: Path, tier: str) -> list[Path]:
    """Fig. 3 for each PGT row whose baseline ran (the baseline may be in another table), Fig. 4 where both runs have
    last.pth, and Fig. 5 where both recorded the filter-norm series."""
    paths = []
    for run in runs:
        base = run.paper.get('baseline')
        if run.name not in results or base not in every or base == run.name:
            continue
        rows = {name: list(every[name].seeds.values()) for name in (base, run.name)}
        published = {name: every[name].run.paper for name in rows} if tier == 'paper' else None
        fig = accuracy_curves_figure(rows, f'{run.name} against {base}', published)
        paths += save_figure(fig, out / f'fig3-{run.name}')
        norms = {name: series(every[name].first_dir) for name in rows}
        if all(norms.values()):
            paths += save_figure(filter_norms_figure(norms), out / f'fig5-{run.name}')
        paths += zeroed_filters_figures({run.name: [every[base], every[run.name]]}, out)
    return paths


def sweep_points(results: dict[str, RowResult]) -> dict[str, dict[float, dict]]:
    """Runs grouped by what they share but alpha ({'model, sched, N epochs': {alpha: final means over seeds}}),
    for the figures against alpha (Fig. 2 and Fig. 6) drawn from every run, grid searches or not."""
    groups: dict[str, dict[float, dict]] = {}
    for result in results.values():
        key = f"{result.model}, {result.config.get('sched', '?')}, {result.planned_epochs} epochs"
        values = {name: result.final_mean(column) for name, column in (
            ('train', 'train_top1'), ('test', 'eval_top1'), ('loss', 'eval_loss'), ('logit_norm', 'eval_logit_norm'))}
        groups.setdefault(key, {}).setdefault(result.alpha, values)  # a run shared by several rows counts once
    return {key: points for key, points in groups.items() if len(points) >= 2}


def alpha_figures(results: dict[str, RowResult], out: Path) -> list[Path]:
    """Fig. 2 (top-1 and the gap against alpha) and Fig. 6 (logit norm and loss against alpha) for every group of
    runs that differ in alpha alone, from the last epoch of each run's summary.csv."""
    groups, paths = sweep_points(results), []
    if groups:
        fig = grid_figure({key: [(a, v['train'], v['test']) for a, v in points.items()]
                           for key, points in groups.items()})
        paths += save_figure(fig, out / 'fig2-alpha')
    for number, (key, points) in enumerate(groups.items()):
        sweep = [{'pgt_alpha': a, 'logit_norm': v['logit_norm'], 'loss': v['loss']} for a, v in points.items()
                 if v['logit_norm'] is not None and v['loss'] is not None]
        if len(sweep) >= 2:
            fig, _ = alpha_sweep_figure(sweep)
            fig.suptitle(key)
            paths += save_figure(fig, out / f'fig6-{key.split(",")[0]}-{number}')
    return paths


def second_layer_norms(run_dir: Path) -> tuple[str, np.ndarray] | None:
    """(name, per-filter L2 norms) of the second weight layer (as the papers number them, pgt.diagnostics) of the
    run's last.pth; None without one."""
    path = run_dir / 'last.pth'
    if not path.is_file():
        return None
    state = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    name, weight = weight_layers(state.items())[1]
    return name, weight.float().flatten(1).norm(dim=1).numpy()


def zeroed_filters_figures(pairs: dict[str, list[RowResult]], out: Path) -> list[Path]:
    """Fig. 4 for each {name: [baseline, PGT run]} (or a single run) whose runs all have last.pth."""
    paths = []
    for name, runs in pairs.items():
        norms = {result.run.name: second_layer_norms(result.first_dir) for result in runs}
        if all(norms.values()):
            layer = next(iter(norms.values()))[0]
            fig = zeroed_filters_figure({label: n for label, (_, n) in norms.items()}, layer, ZERO_FILTER_EPS)
            paths += save_figure(fig, out / f'fig4-{name}')
    return paths


CONDITIONING = {'step_consistency': 'step-consistency', 'gradient_diversity': 'gradient diversity',
                'gradient_confusion': 'gradient confusion', 'gradient_coherence': 'gradient coherence'}


def conditioning_markdown(results: dict[str, RowResult]) -> list[str]:
    """The thesis' measures of gradient conditioning (pgt.diagnostics' diagnostics.csv of each run's first seed):
    their mean over the run's probes, and the zeroed-out filters and dead pooled features at the last probe."""
    lines = []
    for result in dict((r.source, r) for r in results.values()).values():
        path = result.first_dir / 'diagnostics.csv'
        if not path.is_file():
            continue
        with open(path, newline='') as f:
            probes = list(csv.DictReader(f))
        if not probes:
            continue
        means = [fmt(float(np.mean([float(p[key]) for p in probes]))) for key in CONDITIONING]
        lines.append(f'| {result.source} | {result.alpha:g} | {len(probes)} | ' + ' | '.join(means)
                     + f" | {probes[-1]['zeroed_filters']} | {probes[-1]['dead_pooled_features']} |")
    if not lines:
        return []
    header = ['run', 'α', 'probes', *(f'{name} (mean)' for name in CONDITIONING.values()), 'zeroed filters (last)',
              'dead pooled features (last)']
    return (['## Gradient conditioning (diagnostics)', '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
            + lines + [''])


def published_code_run(spec: str, rows: dict[str, PaperRun]) -> dict:
    """A run of the published code given as ROW=DIR: its own args.yaml and summary.csv (the published train.py writes
    both; its epochs count from 1, its training top-1 is train_acc), set beside the row it claims to be."""
    row, _, folder = spec.partition('=')
    if row not in rows or not folder:
        raise UsageError(f'--published-run {spec}: expected ROW=DIR with ROW a row of the tier (e.g. '
                         f'resnet18-cosine-pgt=/runs/published/resnet18-cosine-alpha-0.25)')
    folder = Path(folder)
    for name in ('args.yaml', 'summary.csv'):
        if not (folder / name).is_file():
            raise UsageError(f'--published-run {spec}: {folder / name} not found (the published train.py writes '
                             f'args.yaml and summary.csv into its run folder)')
    published = yaml.safe_load((folder / 'args.yaml').read_text()) or {}
    summary = read_summary(folder)
    if not summary or 'eval_top1' not in summary[0]:
        raise UsageError(f'--published-run {spec}: {folder}/summary.csv has no eval_top1 column')
    recipe, paper = rows[row].args(), rows[row].paper
    alpha = float(published.get('modify_softmax') or 0.0) or 1.0  # 0 (the default) ran without the hook
    differences = [f'{key} {published.get(key)!r} (recipe {value!r})' for key, value in (
        ('model', recipe.model), ('sched', recipe.sched), ('smoothing', recipe.smoothing))
        if published.get(key) != value]
    if alpha != (recipe.pgt_alpha or 1.0):
        differences.append(f'alpha {alpha:g} (recipe {recipe.pgt_alpha or 1.0:g})')
    best = max(float(r['eval_top1']) for r in summary)
    test = paper.get('test_acc')
    return {'row': row, 'folder': str(folder), 'model': published.get('model', '?'), 'alpha': alpha,
            'lr': published.get('lr'), 'batch_per_gpu': published.get('batch_size'), 'epochs': len(summary),
            'test_top1': float(summary[-1]['eval_top1']), 'best_test_top1': best,
            'test_top5': float(summary[-1]['eval_top5']) if summary[-1].get('eval_top5') else None,
            'paper_test': test, 'delta_paper_best_test': best - float(test) if test is not None else None,
            'differs_from_recipe': '; '.join(differences) or 'none'}


def published_code_markdown(found: list[dict]) -> list[str]:
    columns = ['row', 'model', 'α', 'lr', 'batch per GPU', 'epochs', 'test top-1', 'best test', 'test top-5',
               'paper test', 'Δ paper (best test)', 'differs from the recipe']
    lines = ['## Runs of the published code', '', 'Their own args.yaml and summary.csv (`--published-run`), beside the '
             'row each reproduces.', '', '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    for r in found:
        cells = [r['row'], str(r['model']), f"{r['alpha']:g}", str(r['lr']), str(r['batch_per_gpu']), str(r['epochs']),
                 fmt(r['test_top1']), fmt(r['best_test_top1']), fmt(r['test_top5']), fmt(r['paper_test']),
                 fmt(r['delta_paper_best_test'], True), r['differs_from_recipe']]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines + ['']


def other_runs_section(others: dict[str, RowResult], tier: str, out: Path) -> tuple[list[str], list[dict], list]:
    """The table of the runs that are not rows of the tier (their own numbers only), and their Fig. 3 and Fig. 5."""
    rows = [result_row(result) for result in others.values()]
    title = f'{TITLES[OTHER]} (not named after a row of the {tier} tier: no comparison with the papers)'
    figures = []
    for name, result in others.items():
        figures += save_figure(accuracy_curves_figure({name: list(result.seeds.values())}, name), out / f'fig3-{name}')
        norms = series(result.first_dir)
        if norms:
            figures += save_figure(filter_norms_figure({name: norms}), out / f'fig5-{name}')
        figures += zeroed_filters_figures({name: [result]}, out)
    return results_markdown(title, rows, others, with_paper=False), rows, figures


def table_sections(every_run: list[PaperRun], every: dict[str, RowResult], out: Path, tier: str):
    """Each table's results, its PGT rows against their baselines, and its Fig. 3-5: (markdown lines, results.csv
    rows, differences.csv rows, figure paths)."""
    sections, result_rows, difference_rows, figures = [], [], [], []
    for table in TABLES:
        runs = [run for run in every_run if run.table == table]
        results = {run.name: every[run.name] for run in runs if run.name in every}
        if not results:
            continue
        if table in GRID_TABLES:
            sections += grid_markdown(TITLES[table], results, runs)
            continue
        rows = [result_row(results[run.name]) for run in runs if run.name in results]
        diffs = [difference_row(results[run.name], every[run.paper['baseline']],
                                next((r for r in every_run if r.name == run.paper['baseline']), None))
                 for run in runs if run.name in results and run.paper.get('baseline') in every
                 and run.paper['baseline'] != run.name]
        sections += results_markdown(TITLES[table], rows, results, tier == 'paper') + differences_markdown(diffs, tier)
        result_rows += rows
        difference_rows += diffs
        figures += figures_for_table(runs, results, every, out, tier)
    return sections, result_rows, difference_rows, figures


def main(argv) -> int:
    args = parse_args(argv)
    runs_dir, out = Path(args.runs), Path(args.out)
    if not runs_dir.is_dir():
        raise UsageError(f'runs folder not found: {runs_dir}')
    every_run = [run for table in TABLES for run in paper_runs(table, args.tier)]
    published = [published_code_run(spec, {run.name: run for run in every_run}) for spec in args.published_run]
    sweep = [json.loads(Path(f).read_text()) for f in args.validate_json]
    if len(sweep) == 1:
        raise UsageError('an alpha sweep needs validate.py JSON of at least two checkpoints')
    every = collect(every_run, runs_dir)
    others = collect_others(runs_dir, {run.name for run in every_run})
    if not every and not others:
        raise UsageError(f'{runs_dir}: no run in it (a run directory holds summary.csv, or seed<k>/ folders that do)')
    out.mkdir(parents=True, exist_ok=True)
    sections, result_rows, difference_rows, figures = table_sections(every_run, every, out, args.tier)
    notes = SETUP_NOTE + (' ' + DELTA_NOTE if args.tier == 'paper' else '')
    sections = [f'# PGT reproduction report ({args.tier} tier)', '', notes, ''] + sections
    if others:
        lines, rows, other_figures = other_runs_section(others, args.tier, out)
        sections += lines
        result_rows += rows
        figures += other_figures
    if published:
        sections += published_code_markdown(published)
        write_csv(out / 'published_runs.csv', published)
    sections += conditioning_markdown({**every, **others})
    figures += alpha_figures({**every, **others}, out)
    if sweep:
        figures += save_figure(alpha_sweep_figure(sweep)[0], out / 'fig6-alpha-sweep')
    write_csv(out / 'results.csv', result_rows)
    write_csv(out / 'differences.csv', difference_rows)
    sections += ['## Figures', ''] + [f'![{p.stem}]({p.name})' for p in figures if p.suffix == '.png']
    (out / 'report.md').write_text('\n'.join(sections) + '\n')
    print(f'wrote {out / "report.md"}, results.csv, differences.csv and {len(figures) // 2} figure(s)')
    return 0


def cli() -> None:
    """The ``pgt-report`` console command (and ``python scripts/report.py``)."""
    run_cli(main)


if __name__ == '__main__':
    cli()
