"""A SLURM array script for a list of jobs (pgt-reproduce --slurm): one array task per (experiment, seed).

What the script does that SLURM does not do for it:
- the log folder (``--output`` of sbatch) must exist when the task starts, or the task dies without a log: it is
  created when the script is written, and again by the script;
- ``srun`` is given ``--cpus-per-task`` (slurm_step.sh): Slurm 22.05-23.02 do not pass the batch job's value down,
  so the ranks and their loader workers would share one core;
- the environment: ranks are started by the Python that wrote the script (``--python``), as
  ``python -m pgt.launch`` (torchrun with the stop signals and grace of pgt.launch), so no environment needs
  activating on the node;
- the rendezvous port is derived from the task's job id, so two tasks on one node do not collide;
- ``--gpus`` may be typed (``a100:4``): the count, not the whole value, is the number of ranks;
- ``--max-concurrent N`` caps the tasks that run at once (``--array=0-K%N``).
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

from .errors import UsageError

TEMPLATE = '''#!/usr/bin/env bash
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}{limit}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus}
#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={log_dir}/%x-%A_%a.out
{extra_lines}# Written by pgt-reproduce: one array task per run and seed. scripts/slurm_step.sh turns SLURM's warning
# signal into a recovery checkpoint (train.py exits 75) and requeues the task, which resumes with --resume auto.
set -uo pipefail
cd {root}
mkdir -p {log_dir}
PYTHON={python}
port=$(( 20000 + SLURM_JOB_ID % 20000 ))  # every array task has a job id of its own
runs=(
{runs}
)
eval "train_args=(${{runs[$SLURM_ARRAY_TASK_ID]}})"
exec bash scripts/slurm_step.sh "$PYTHON" -m pgt.launch --nnodes=1 --nproc-per-node={nproc} \\
    --rdzv-backend=c10d --rdzv-endpoint="localhost:$port" --rdzv-id="$SLURM_JOB_ID" \\
    train.py "${{train_args[@]}}"
'''


def gpu_count(spec: str) -> int:
    """The number of GPUs in a --gpus-per-node value: '4' or 'TYPE:4'."""
    match = re.fullmatch(r'(?:[A-Za-z0-9_.-]+:)?(\d+)', spec)
    if not match or int(match.group(1)) < 1:
        raise UsageError(f'--gpus: expected a count or TYPE:COUNT (e.g. 4 or a100:4), got {spec!r}')
    return int(match.group(1))


def array_script(train_args: list[list[str]], *, root: Path, job_name: str, gpus: str, cpus_per_gpu: int, time: str,
                 log_dir: Path, python: str, max_concurrent: int | None = None, partition: str | None = None,
                 account: str | None = None, mem: str | None = None) -> str:
    """The script's text; ``train_args`` holds each task's train.py arguments."""
    count = gpu_count(gpus)
    extra = [f'#SBATCH --{key}={value}' for key, value in
             (('partition', partition), ('account', account), ('mem', mem)) if value]
    return TEMPLATE.format(
        job_name=job_name, last=len(train_args) - 1, limit=f'%{max_concurrent}' if max_concurrent else '',
        gpus=gpus, cpus=cpus_per_gpu * count, time=time, log_dir=shlex.quote(str(log_dir)),
        extra_lines=''.join(line + '\n' for line in extra), root=shlex.quote(str(root)),
        python=shlex.quote(python), nproc=count,
        runs='\n'.join(f'    {shlex.quote(shlex.join(args))}' for args in train_args))
