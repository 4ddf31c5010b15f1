"""Run the papers' tables from their recipes: list the commands, run them here, or write a SLURM array script.

    pgt-reproduce --table 1 --data-dir /imagenet --dry-run                  # one command per run (and seed)
    pgt-reproduce --table 2 --data-dir /imagenet --nproc-per-node 4         # run them here, one after another
    pgt-reproduce --table all --data-dir /imagenet --seeds 0 1 2 --slurm all.sbatch --gpus a100:4 --max-concurrent 8
    pgt-reproduce --tier budget --table 1 --data-dir /imagenet --seeds 0 1 2 --dry-run   # the low-cost tier
    pgt-reproduce --table 1 --variant published-command --dry-run     # the published command's lr, loop and hook

(``python scripts/reproduce.py`` is the same program.) Each run writes to <runs-dir>/<row name>, or
<runs-dir>/<row name>/seed<k> with --seeds, and is started with --resume auto, so an interrupted table continues
where it stopped; runs whose summary.csv already has every epoch are skipped. Rows that are the same experiment
(Table 3 repeats four Table 1 rows) run once; --dry-run says which rows share a run. Tables: 1, 2, 3, fig3c (the
60-epoch run), grid (the alpha grid searches and the clipping grids of the non-BN ResNet-18), and, not in 'all':
extended (grid alphas beyond the paper's) and cifar (the ResNet-20 grid on CIFAR-10; --data-dir is then CIFAR-10's).
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from .errors import CliParser, UsageError, run_cli
from .paper import TABLES, TIERS, configs_dir, jobs, paper_runs
from .recipes import load_recipe
from .slurm import array_script, gpu_count


def parse_args(argv):
    p = CliParser(description=__doc__)
    p.add_argument('--table', required=True, choices=TABLES + ('all',))
    p.add_argument('--tier', default='paper', choices=tuple(TIERS),
                   help='paper: the published rows; budget: the same rows shrunk about 6x (configs/budget/)')
    p.add_argument('--data-dir', default='/imagenet')
    p.add_argument('--runs-dir', default=None, help='default: runs/<tier>')
    p.add_argument('--seeds', type=int, nargs='+', default=None, metavar='K',
                   help='run every row once per seed, into <runs-dir>/<row>/seed<k>')
    p.add_argument('--nproc-per-node', type=int, default=4)
    p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    p.add_argument('--variant', choices=sorted(path.stem for path in (configs_dir() / 'variants').glob('*.yaml')),
                   help='options from configs/variants/<name>.yaml on top of every recipe (default runs-dir: '
                        'runs/<tier>-<variant>)')
    slurm = p.add_argument_group('SLURM (--slurm FILE writes an array script instead of running)')
    slurm.add_argument('--slurm', metavar='FILE')
    slurm.add_argument('--gpus', default=None, metavar='[TYPE:]N', help='GPUs per node (default: --nproc-per-node)')
    slurm.add_argument('--cpus-per-gpu', type=int, default=8)
    slurm.add_argument('--time', default='72:00:00', help='time limit per task')
    slurm.add_argument('--partition')
    slurm.add_argument('--account')
    slurm.add_argument('--mem', help="memory per node, SLURM's syntax (e.g. 256G)")
    slurm.add_argument('--max-concurrent', type=int, default=None, metavar='N', help='array tasks running at once')
    slurm.add_argument('--python', default=sys.executable,
                       help='the Python (of the suite\'s environment) that the tasks run (default: this one)')
    p.add_argument('--debug', action='store_true')
    p.add_argument('extra', nargs='*', help='further train.py options, after --')
    args = p.parse_args(argv)
    args.runs_dir = Path(args.runs_dir or f'runs/{args.tier}' + (f'-{args.variant}' if args.variant else ''))
    if args.variant:
        args.extra = variant_options(configs_dir() / 'variants' / f'{args.variant}.yaml') + args.extra
    return args


def variant_options(path: Path) -> list[str]:
    """A variant file's keys as train.py options (``key: value`` as a recipe writes it, true/false as --key and
    --no-key), to follow the recipe on the command line."""
    mapping, _ = load_recipe(path)
    options = []
    for key, value in mapping.items():
        key = key.replace('_', '-')
        if isinstance(value, bool):
            options.append(f'--{"" if value else "no-"}{key}')
        else:
            options += [f'--{key}', *map(str, value if isinstance(value, list) else [value])]
    return options


def launcher(nproc: int) -> list[str]:
    """torchrun of this environment (``python -m pgt.launch``, torchrun with the stop signals and grace of
    pgt.launch; no torchrun needs to be on PATH)."""
    return [sys.executable, '-m', 'pgt.launch', '--standalone', f'--nproc-per-node={nproc}']


def main(argv) -> int:
    args = parse_args(argv)
    root = configs_dir().parent
    runs = paper_runs(args.table, args.tier)
    if not runs:
        raise UsageError(f'no recipes found for table {args.table} of the {args.tier} tier')
    todo = jobs(runs, args.runs_dir, args.seeds)
    for name, row in dict.fromkeys((job.run.name, row.name) for job in todo for row in job.shared_by):
        print(f'# {row}: the same run as {name}')
    if args.slurm:
        log_dir = args.runs_dir / 'slurm-logs'
        log_dir.mkdir(parents=True, exist_ok=True)  # SLURM opens the task's log before the script runs
        gpus = args.gpus or str(args.nproc_per_node)
        gpu_count(gpus)
        script = array_script([job.train_args(args.data_dir, args.extra) for job in todo], root=root,
                              job_name=f'pgt-{args.tier}-{args.table}', gpus=gpus, cpus_per_gpu=args.cpus_per_gpu,
                              time=args.time, log_dir=log_dir.resolve(), python=args.python,
                              max_concurrent=args.max_concurrent, partition=args.partition, account=args.account,
                              mem=args.mem)
        Path(args.slurm).write_text(script)
        print(f'wrote {args.slurm}: {len(todo)} array tasks (logs in {log_dir}); submit with: sbatch {args.slurm}')
        return 0
    for job in todo:
        if job.finished():
            print(f'# {job.label}: finished, skipped')
            continue
        cmd = [*launcher(args.nproc_per_node), 'train.py', *job.train_args(args.data_dir, args.extra)]
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            status = subprocess.call(cmd, cwd=root)
            if status != 0:
                print(f'# {job.label} exited {status}; rerun the same command to resume', file=sys.stderr)
                return status
    return 0


def cli() -> None:
    """The ``pgt-reproduce`` console command (and ``python scripts/reproduce.py``)."""
    run_cli(main)


if __name__ == '__main__':
    cli()
