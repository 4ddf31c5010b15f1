"""One job per run directory, as a cluster's first weeks test it: a second job on a directory in use (a requeue
racing a manual restart), two jobs started in the same second without --output, and ranks whose launcher was
killed (pgt.runlock, pgt.preemption.PreemptionFlag.watch_launcher)."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (BASE, ROOT, TINY, one_line_error, read_until, run_main, start_training, torchrun_command)
from pgt.checkpoint import prepare_run_dir
from pgt.errors import UsageError
from pgt.runlock import RunLock


def test_a_second_job_on_a_directory_in_use_stops_naming_the_holder(tiny_data, tmp_path):
    run_dir = tmp_path / 'run'
    first = start_training(*BASE, '--data-dir', tiny_data, '--output', run_dir, '--epochs', 50, '--resume', 'auto')
    try:
        read_until(first, r'epoch 0/\d+ step 4/')  # past the recovery checkpoint of step 3
        second = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--epochs', 50,
                          '--resume', 'auto')
        assert second.returncode == 2
        assert re.fullmatch(rf'error: {run_dir} is in use by another job \(host \S+, pid {first.pid}, since '
                            r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to end, or stop it, before starting this '
                            r'one', one_line_error(second.stderr))
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a node failure: the kernel releases the lock with the process
        first.wait()
    assert (run_dir / 'train.log').read_text().count(' pgt 0.3.0 (') == 1  # the second job wrote nothing
    again = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto', '--epochs',
                     50, '--stop-after-epoch', 0, check=True)
    assert 'resuming from' in again.stderr


def test_a_directory_that_another_job_began_while_this_one_started_is_refused(tmp_path):
    """The directory did not exist when this job checked it; by the time it creates it another job has begun a run
    there and ended: the lock is free, the run files are not this job's."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'summary.csv').write_text('epoch\n0\n')
    with pytest.raises(UsageError, match=f'{run_dir}: another job began a run there while this one was starting'):
        prepare_run_dir(run_dir, None, False, RunLock(run_dir))


@pytest.mark.slow
def test_two_jobs_started_in_the_same_second_without_output_get_their_own_directories(tiny_data, tmp_path):
    jobs = [subprocess.Popen([sys.executable, str(ROOT / 'train.py'), '--config', str(TINY), '--data-dir',
                              str(tiny_data), '--epochs', '2', '--cooldown-epochs', '0', '--seed', seed, '--workers',
                              '0'],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})  # two processes on the cores
            for seed in ('1', '2')]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / 'runs').iterdir())
    assert len(runs) == 2 and all(re.fullmatch(r'test_resnet-\d{8}-\d{6}-[0-9a-f]{6}', p.name) for p in runs)
    seeds = sorted(torch.load(p / 'last.pth', weights_only=True)['args']['seed'] for p in runs)
    assert seeds == [1, 2]  # each directory holds one job's run, not a mix of both


@pytest.mark.slow
def test_ranks_stop_and_save_when_their_launcher_is_killed(tiny_data, tmp_path):
    """kill -9 of torchrun's process group reaches the agent only (each rank has a session of its own): the ranks
    notice that their launcher is gone, stop at the next step they agree on with a recovery checkpoint, and free the
    run directory."""
    run_dir = tmp_path / 'run'
    agent = start_training(command=torchrun_command(*BASE, '--data-dir', tiny_data, '--output', run_dir,
                                                    '--global-batch-size', 32, '--epochs', 50,
                                                    '--signal-check-interval', 1, '--recovery-interval', 0))
    read_until(agent, r'epoch 0/\d+ step 2/')
    ranks = [int(pid) for pid in subprocess.run(['pgrep', '-P', str(agent.pid)], capture_output=True,
                                                text=True).stdout.split()]
    assert len(ranks) == 2
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()
    deadline = time.monotonic() + 60
    while any(os.path.exists(f'/proc/{pid}') for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(os.path.exists(f'/proc/{pid}') for pid in ranks), 'ranks still running after their launcher died'
    assert torch.load(run_dir / 'recovery.pth', weights_only=True)['epoch'] < 49  # the stop's, not the run's end
    lock = RunLock(run_dir)
    lock.acquire()  # free again
    lock.release()
