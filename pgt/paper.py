"""The papers' runs as data: which recipes make up each table, which rows share one experiment, and the jobs (one
per experiment and seed) that reproduce them, with the run directory each writes.

Recipes live in configs/paper/ (the published rows, the grid searches, the CIFAR-10 grid) and configs/budget/ (a
cheaper tier of the same rows). A row's recipe names its table in its ``paper:`` block; a grid recipe lists the
values it sweeps in its ``grid:`` block, and expands into one run per combination. Rows whose resolved
configurations are the same (Table 3 repeats four Table 1 rows) are one experiment: it runs once, under the first
row's name, and the report fills every row from it.

Run directories: ``<runs>/<name>`` for a run of the recipe's own seed; ``<runs>/<name>/seed<k>`` for each seed of
``--seeds``. Both count as seeds of the row.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import OPERATIONAL_KEYS, finalize_args, parse_config, resolved_config
from .optim import total_epochs
from .runlog import read_summary

TABLES = ('1', '2', '3', 'fig3c', 'grid', 'extended', 'cifar')
ALL_TABLES = ('1', '2', '3', 'fig3c', 'grid')  # --table all; the extended grid and CIFAR-10 are asked for by name
TIERS = {'paper': 'paper', 'budget': 'budget'}  # tier -> folder of configs/
GRID_TABLES = {'grid': 'grid', 'extended': 'grid/extended', 'cifar': 'grid/cifar'}  # table -> folder of the tier
SHORT_NAMES = {'pgt_alpha': 'alpha', 'clip_grad': 'clip'}  # grid keys in run names


def configs_dir() -> Path:
    """The configs/ folder of the checkout this package runs from (a clone, or an editable install), else the one in
    the current directory."""
    beside = Path(__file__).resolve().parents[1] / 'configs'
    return beside if beside.is_dir() else Path.cwd() / 'configs'


@dataclass
class PaperRun:
    name: str
    recipe: Path
    table: str
    overrides: list = field(default_factory=list)
    paper: dict = field(default_factory=dict)

    def args(self):
        return finalize_args(parse_config(['--config', str(self.recipe), *self.overrides]), world_size=1)

    def experiment(self) -> str:
        """What the run trains: its resolved configuration without provenance and operational options."""
        config = {k: v for k, v in resolved_config(self.args()).items()
                  if k not in OPERATIONAL_KEYS and k not in ('paper', 'grid')}
        return yaml.safe_dump(config, sort_keys=True)


def _grid_runs(recipe: Path, table: str) -> list[PaperRun]:
    """One run per combination of the recipe's ``grid:`` values, named after the recipe and the values."""
    args = parse_config(['--config', str(recipe)])
    grid = {key.replace('-', '_'): values for key, values in (args.grid or {}).items()}
    runs = []
    for combination in itertools.product(*grid.values()):
        overrides, label = [], [f'grid-{recipe.stem}']
        for key, value in zip(grid, combination):
            overrides += [f'--{key.replace("_", "-")}', f'{value:g}' if isinstance(value, float) else str(value)]
            label.append(f'{SHORT_NAMES.get(key, key)}{overrides[-1]}')
        runs.append(PaperRun('-'.join(label), recipe, table, overrides, args.paper or {}))
    return runs


def paper_runs(table: str, tier: str = 'paper', configs: Path | None = None) -> list[PaperRun]:
    """The runs of one table of a tier ('1', '2', '3', 'fig3c', 'grid', 'extended', 'cifar'), or of 'all' of
    ALL_TABLES."""
    folder = (configs or configs_dir()) / TIERS[tier]
    if table == 'all':
        return [run for t in ALL_TABLES for run in paper_runs(t, tier, configs)]
    if table in GRID_TABLES:
        return [run for recipe in sorted((folder / GRID_TABLES[table]).glob('*.yaml'))
                for run in _grid_runs(recipe, table)]
    runs = []
    for recipe in sorted(folder.glob('*.yaml')):
        paper = parse_config(['--config', str(recipe)]).paper or {}
        if str(paper.get('table')) == table:
            runs.append(PaperRun(recipe.stem, recipe, table, [], paper))
    return runs


def experiments(runs: list[PaperRun]) -> list[list[PaperRun]]:
    """The runs grouped by experiment, in order of first appearance; the first run of a group names it."""
    groups: dict[str, list[PaperRun]] = {}
    for run in runs:
        groups.setdefault(run.experiment(), []).append(run)
    return list(groups.values())


@dataclass
class Job:
    run: PaperRun  # the run that names the experiment
    shared_by: list[PaperRun]  # the other rows of the same experiment
    seed: int | None  # None: the recipe's own seed, in the single-seed layout
    run_dir: Path

    @property
    def label(self) -> str:
        return self.run.name if self.seed is None else f'{self.run.name} seed {self.seed}'

    def train_args(self, data_dir: str, extra: list[str]) -> list[str]:
        """train.py's arguments, the recipe relative to the checkout (the commands run from its root)."""
        seed = [] if self.seed is None else ['--seed', str(self.seed)]
        recipe = self.run.recipe.resolve()
        root = configs_dir().parent.resolve()
        recipe = recipe.relative_to(root) if recipe.is_relative_to(root) else recipe
        return ['--config', str(recipe), '--data-dir', data_dir, '--output', str(self.run_dir),
                '--resume', 'auto', *self.run.overrides, *seed, *extra]

    def finished(self) -> bool:
        return len(read_summary(self.run_dir)) >= total_epochs(self.run.args())


def jobs(runs: list[PaperRun], runs_dir: Path, seeds: list[int] | None = None) -> list[Job]:
    """One job per experiment and seed."""
    found = []
    for group in experiments(runs):
        first, others = group[0], group[1:]
        for seed in seeds or [None]:
            run_dir = runs_dir / first.name if seed is None else runs_dir / first.name / f'seed{seed}'
            found.append(Job(first, others, seed, run_dir))
    return found


def seed_runs(runs_dir: Path, name: str) -> dict[int, Path]:
    """{seed: run directory} of an experiment: ``<runs>/<name>`` (its config.yaml names the seed) and every
    ``<runs>/<name>/seed<k>``, those with a summary.csv."""
    found = {}
    single = runs_dir / name
    if (single / 'summary.csv').is_file():
        config = yaml.safe_load((single / 'config.yaml').read_text()) if (single / 'config.yaml').is_file() else {}
        found[int(config.get('seed', -1))] = single
    for folder in sorted(single.glob('seed*')):
        if folder.name[4:].isdigit() and (folder / 'summary.csv').is_file():
            found[int(folder.name[4:])] = folder
    return found
