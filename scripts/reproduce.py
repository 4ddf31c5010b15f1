#!/usr/bin/env python3
"""Run the papers' tables from their recipes: list the commands, run them here, or write a SLURM array script.

    python scripts/reproduce.py --table 1 --data-dir /imagenet --dry-run            # one torchrun command per row
    python scripts/reproduce.py --table 2 --data-dir /imagenet --nproc-per-node 4   # run them one after another
    python scripts/reproduce.py --table all --data-dir /imagenet --slurm table.sbatch --gpus 4

Each run writes to <runs-dir>/<row name> and is started with --resume auto, so an interrupted table continues
where it stopped; runs whose summary.csv already has every epoch are skipped.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pgt.errors import UsageError, run_cli  # noqa: E402
from pgt.paper import TABLES, is_finished, paper_runs  # noqa: E402

SLURM_TEMPLATE = '''#!/usr/bin/env bash
#SBATCH --job-name=pgt-{table}
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={runs_dir}/slurm-%A_%a.out
# Written by scripts/reproduce.py: one array task per run. scripts/slurm_step.sh turns SLURM's warning signal into a
# recovery checkpoint (train.py exits 75) and requeues the task, which resumes with --resume auto.
set -uo pipefail
cd {root}
commands=(
{commands}
)
eval "exec bash scripts/slurm_step.sh ${{commands[$SLURM_ARRAY_TASK_ID]}}"
'''


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--table', required=True, choices=TABLES + ('all',))
    p.add_argument('--data-dir', default='/imagenet')
    p.add_argument('--runs-dir', default='runs/paper')
    p.add_argument('--nproc-per-node', type=int, default=4)
    p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
    p.add_argument('--slurm', metavar='FILE', help='write a SLURM array script instead of running')
    p.add_argument('--gpus', type=int, default=None,
                   help='GPUs per node in the SLURM script (default: --nproc-per-node)')
    p.add_argument('--time', default='72:00:00', help='SLURM time limit per job')
    p.add_argument('--debug', action='store_true')
    p.add_argument('extra', nargs='*', help='further train.py options, after --')
    return p.parse_args(argv)


def command(run, args, nproc: int) -> list[str]:
    return ['torchrun', '--standalone', f'--nproc-per-node={nproc}', 'train.py', '--config',
            str(run.recipe.relative_to(ROOT)), '--data-dir', args.data_dir, '--output',
            str(Path(args.runs_dir) / run.name), '--resume', 'auto', *run.overrides, *args.extra]


def main(argv) -> int:
    args = parse_args(argv)
    runs = paper_runs(args.table)
    if not runs:
        raise UsageError(f'no recipes found for table {args.table}')
    if args.slurm:
        gpus = args.gpus or args.nproc_per_node
        lines = '\n'.join(f'    {shlex.quote(shlex.join(command(run, args, gpus)))}' for run in runs)
        Path(args.slurm).write_text(SLURM_TEMPLATE.format(
            table=args.table, last=len(runs) - 1, gpus=gpus, cpus=8 * gpus, time=args.time,
            runs_dir=args.runs_dir, root=shlex.quote(str(ROOT)), commands=lines))
        print(f'wrote {args.slurm}: {len(runs)} array tasks; submit with: sbatch {args.slurm}')
        return 0
    for run in runs:
        cmd = command(run, args, args.nproc_per_node)
        if is_finished(run, Path(args.runs_dir) / run.name):
            print(f'# {run.name}: finished, skipped')
            continue
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            status = subprocess.call(cmd, cwd=ROOT)
            if status != 0:
                print(f'# {run.name} exited {status}; rerun the same command to resume', file=sys.stderr)
                return status
    return 0


if __name__ == '__main__':
    run_cli(main)
