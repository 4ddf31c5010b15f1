"""The paper recipes as data: which runs make up each table, and what a run directory says about its progress."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import finalize_args, parse_config
from .optim import total_epochs
from .runlog import read_summary

PAPER_DIR = Path(__file__).resolve().parents[1] / 'configs' / 'paper'
# ICLR Sec. 3.1: alpha 0.1 to 0.9 by 0.1, then 0.2 to 0.4 by 0.05; 1.0 is the baseline of the sweep.
GRID_ALPHAS = sorted({round(0.1 * i, 2) for i in range(1, 10)} | {round(0.2 + 0.05 * i, 2) for i in range(5)} | {1.0})
TABLES = ('1', '2', '3', 'fig3c', 'grid')


@dataclass
class PaperRun:
    name: str
    recipe: Path
    table: str
    overrides: list = field(default_factory=list)
    paper: dict = field(default_factory=dict)

    def args(self):
        return finalize_args(parse_config(['--config', str(self.recipe), *self.overrides]), world_size=1)


def paper_runs(table: str, paper_dir: Path = PAPER_DIR) -> list[PaperRun]:
    """The runs of one table ('1', '2', '3', 'fig3c', 'grid') or of all of them ('all')."""
    if table == 'all':
        return [run for t in TABLES for run in paper_runs(t, paper_dir)]
    if table == 'grid':
        return [PaperRun(f'grid-{recipe.stem}-alpha{alpha:g}', recipe, 'grid',
                         [] if alpha == 1.0 else ['--pgt-alpha', f'{alpha:g}'])
                for recipe in sorted((paper_dir / 'grid').glob('*.yaml')) for alpha in GRID_ALPHAS]
    runs = []
    for recipe in sorted(paper_dir.glob('*.yaml')):
        paper = parse_config(['--config', str(recipe)]).paper or {}
        if str(paper.get('table')) == table:
            runs.append(PaperRun(recipe.stem, recipe, table, [], paper))
    return runs


def is_finished(run: PaperRun, run_dir: Path) -> bool:
    return len(read_summary(run_dir)) >= total_epochs(run.args())
