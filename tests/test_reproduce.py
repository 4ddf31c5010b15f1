"""scripts/reproduce.py: the jobs of each table (one per experiment and seed), the rows that share a run, and the
SLURM array, which is run here under stand-in srun and scontrol executables."""
import csv
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, lr_curve, run_main
from references import fork_epoch_rates
from pgt import reproduce

TABLE1 = [r['row'] for r in csv.DictReader(open(ROOT / 'configs/paper/published.csv')) if r['table'] == '1']
LAUNCHER = f'{sys.executable} -m pgt.launch --standalone --nproc-per-node=4 train.py '


def commands(stdout):
    return [line for line in stdout.splitlines() if line.startswith(LAUNCHER)]


def listing(capsys, *argv) -> str:
    """What reproduce.py prints, run in this process (the CLI itself is run as a program by the last tests)."""
    assert reproduce.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_dry_run_prints_one_command_per_table1_row(capsys):
    lines = commands(listing(capsys, '--table', '1', '--dry-run', '--data-dir', '/data/imagenet'))
    assert len(lines) == len(TABLE1) == 14
    for row in TABLE1:
        [line] = [c for c in lines if f'--config configs/paper/{row}.yaml ' in c]
        assert f'--output runs/paper/{row} ' in line and '--resume auto' in line and '--data-dir /data/imagenet' in line


def test_table3_rows_that_repeat_table1_rows_run_once(capsys):
    out = listing(capsys, '--table', 'all', '--dry-run')
    shared = re.findall(r'^# (\S+): the same run as (\S+)$', out, re.M)
    assert sorted(shared) == [('table3-row1-resnet50-step-baseline', 'resnet50-step-baseline'),
                              ('table3-row2-resnet50-step-pgt0.3', 'resnet50-step-pgt'),
                              ('table3-row3-resnet50-cosine-baseline', 'resnet50-cosine-baseline'),
                              ('table3-row7-resnet50-cosine-pgt0.05', 'resnet50-cosine-pgt')]
    lines = commands(out)
    assert not [line for line in lines if 'table3-row1-' in line or 'table3-row7-' in line]
    rows = [r for r in csv.DictReader(open(ROOT / 'configs/paper/published.csv'))]
    resnet50_rows = sum(r['model'] == 'resnet50' for r in rows)
    resnet50_runs = sum(bool(re.search(r'--config configs/paper/(table3-row\d-)?resnet50-(?!.*60ep)', line))
                        for line in lines)
    assert resnet50_runs == resnet50_rows - 4


def test_the_published_command_variant_runs_each_row_as_the_published_command_did(capsys):
    """--lr 0.1 at 4 x 256, the parser's warmup-lr 0.01 and min-lr 1e-4, the published epoch loop and hook; the
    row's own alpha, smoothing and schedule shape."""
    from pgt.config import finalize_args, parse_config
    lines = commands(listing(capsys, '--table', '1', '--variant', 'published-command', '--dry-run'))
    assert len(lines) == len(TABLE1)
    [line] = [c for c in lines if '--config configs/paper/resnet18-cosine-pgt.yaml ' in c]
    assert '--output runs/paper-published-command/resnet18-cosine-pgt ' in line
    args = finalize_args(parse_config(line[len(LAUNCHER):].split()), world_size=4)
    row = finalize_args(parse_config(['--config', str(ROOT / 'configs/paper/resnet18-cosine-pgt.yaml')]), 4)
    assert (args.lr, args.warmup_lr, args.min_lr, args.schedule_origin, args.pgt_impl) == (0.1, 0.01, 1e-4, 'fork',
                                                                                            'hook')
    assert (args.pgt_alpha, args.smoothing, args.sched, args.epochs, args.global_batch_size) == (
        row.pgt_alpha, row.smoothing, row.sched, row.epochs, 1024)
    assert lr_curve(args) == pytest.approx(fork_epoch_rates(args), rel=1e-12)
    assert lr_curve(args)[:5] == pytest.approx([0.01, 0.046, 0.064, 0.082, 0.09924], abs=5e-5)


def test_seeds_give_a_job_per_row_and_seed_with_its_own_folder(tmp_path, capsys):
    lines = commands(listing(capsys, '--table', '1', '--seeds', 0, 1, 2, '--dry-run', '--runs-dir', tmp_path))
    assert len(lines) == 3 * 14
    for row in TABLE1:
        jobs = [line for line in lines if f'--config configs/paper/{row}.yaml ' in line]
        assert [re.search(r'--seed (\d+)', j).group(1) for j in jobs] == ['0', '1', '2']
        assert [re.search(r'--output (\S+)', j).group(1) for j in jobs] == [f'{tmp_path}/{row}/seed{k}'
                                                                            for k in range(3)]


def finished(run_dir, epochs=100):
    run_dir.mkdir(parents=True)
    (run_dir / 'summary.csv').write_text('epoch,train_loss\n' + ''.join(f'{e},1.0\n' for e in range(epochs)))


def test_finished_jobs_are_skipped(tmp_path, capsys):
    finished(tmp_path / 'resnet18-cosine-baseline' / 'seed1')
    finished(tmp_path / 'resnet18-cosine-pgt' / 'seed0', epochs=40)  # an interrupted job is not finished
    out = listing(capsys, '--table', '1', '--seeds', 0, 1, 2, '--dry-run', '--runs-dir', tmp_path)
    assert '# resnet18-cosine-baseline seed 1: finished, skipped' in out
    assert len(commands(out)) == 3 * 14 - 1
    single = listing(capsys, '--table', '1', '--dry-run', '--runs-dir', tmp_path / 'one')
    assert len(commands(single)) == 14  # the single-seed layout: no --seed, runs/<row>


def test_slurm_array_has_a_task_per_job_and_the_cluster_options(tmp_path):
    script = tmp_path / 'table1.sbatch'
    result = run_main('scripts/reproduce.py', '--table', '1', '--seeds', 0, 1, 2, '--slurm', script, '--gpus',
                      'a100:4', '--max-concurrent', 8, '--partition', 'gpu', '--account', 'lab', '--mem', '256G',
                      '--runs-dir', tmp_path / 'runs', check=True)
    text = script.read_text()
    assert '#SBATCH --array=0-41%8' in text and '#SBATCH --gpus-per-node=a100:4' in text
    assert '#SBATCH --cpus-per-task=32' in text and '--nproc-per-node=4' in text
    assert all(f'#SBATCH --{line}' in text for line in ('partition=gpu', 'account=lab', 'mem=256G'))
    assert (tmp_path / 'runs' / 'slurm-logs').is_dir() and f'{tmp_path}/runs/slurm-logs/%x-%A_%a.out' in text
    assert subprocess.run(['bash', '-n', str(script)]).returncode == 0
    assert 'wrote' in result.stdout and '42 array tasks' in result.stdout
    bad = run_main('scripts/reproduce.py', '--table', '1', '--slurm', script, '--gpus', 'a100')
    assert bad.returncode == 2 and "--gpus: expected a count or TYPE:COUNT (e.g. 4 or a100:4), got 'a100'" in bad.stderr


STAND_IN = '''#!/usr/bin/env bash
# A stand-in for SLURM's {name}: record the arguments, then (srun) run the command without its srun options.
printf '%s\\n' "$@" > "{log}/{name}-$SLURM_JOB_ID.args"
{run}
'''


@pytest.fixture
def slurm_stand_ins(tmp_path):
    bin_dir, log = tmp_path / 'bin', tmp_path / 'calls'
    bin_dir.mkdir()
    log.mkdir()
    run = '[ -n "${RECORD_ONLY:-}" ] && exit 0\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"'
    for name, body in (('srun', run), ('scontrol', 'exit 0')):
        (bin_dir / name).write_text(STAND_IN.format(name=name, log=log, run=body))
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


@pytest.mark.slow
def test_the_array_script_runs_under_stand_ins_for_srun_and_scontrol(tmp_path, slurm_stand_ins):
    """Two tasks of the array: the first runs train.py --dry-run through torchrun as the node would, the second's
    srun only records what it would run (the same path again, for another row)."""
    bin_dir, calls = slurm_stand_ins
    script = tmp_path / 'table2.sbatch'
    runs = tmp_path / 'runs'
    run_main('scripts/reproduce.py', '--table', '2', '--slurm', script, '--gpus', 1, '--runs-dir', runs,
             '--', '--dry-run', check=True)
    env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_CPUS_PER_TASK': '3',
           'SLURM_ARRAY_JOB_ID': '100'}
    outputs = []
    for task, job_id in ((0, 101), (1, 102)):
        result = subprocess.run(['bash', str(script)], env={**env, 'SLURM_ARRAY_TASK_ID': str(task),
                                                            'SLURM_JOB_ID': str(job_id),
                                                            **({'RECORD_ONLY': '1'} if task else {})},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    assert 'model: resnet18_nobn' in outputs[0]  # train.py ran (--dry-run prints the configuration)
    first, second = ((calls / f'srun-{job}.args').read_text().splitlines() for job in (101, 102))
    assert first[:2] == ['--kill-on-bad-exit=1', '--cpus-per-task=3']
    assert first[2:5] == [sys.executable, '-m', 'pgt.launch']  # torchrun of the environment that wrote the script
    ports = [next(a for a in args if a.startswith('--rdzv-endpoint=')) for args in (first, second)]
    assert ports == ['--rdzv-endpoint=localhost:20101', '--rdzv-endpoint=localhost:20102']
    configs = [next(args[i + 1] for i, a in enumerate(args) if a == '--config') for args in (first, second)]
    assert configs[0] != configs[1] and all(c.startswith('configs/paper/nobn-') for c in configs)
    assert not list(calls.glob('scontrol-*'))  # finished normally: no requeue
    assert (runs / 'slurm-logs').is_dir()


@pytest.mark.parametrize('code,requeued', [(0, False), (2, False), (3, False), (1, False), (75, True)])
def test_the_slurm_step_requeues_only_a_run_that_stopped_and_saved(code, requeued, tmp_path, slurm_stand_ins):
    """Exit 75 (stopped on a signal, recovery checkpoint written) requeues the job; bad input (2) and a diverged run
    (3) fail the same way every time, and a crash (1) that --max-restarts could not mend is not retried forever."""
    bin_dir, calls = slurm_stand_ins
    env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SLURM_JOB_ID': '7'}
    result = subprocess.run(['bash', str(ROOT / 'scripts' / 'slurm_step.sh'), 'bash', '-c', f'exit {code}'], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == code
    assert (calls / 'scontrol-7.args').exists() == requeued
