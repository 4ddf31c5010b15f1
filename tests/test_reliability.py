"""Preemption, crashes, damaged checkpoints, non-finite steps and unreadable images."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, run_script
from pgt.runlog import read_summary
from pgt import PowerGradCrossEntropy
from pgt.checkpoint import find_resume_checkpoint, save_checkpoint
from pgt.errors import Preempted, TrainingDiverged, UsageError

SMOKE = ROOT / 'configs' / 'smoke.yaml'
# 10 steps per epoch on the tiny set; a recovery checkpoint every 3 steps; one log line per step (no terminal).
BASE = ['--config', SMOKE, '--epochs', 2, '--cooldown-epochs', 0, '--recovery-interval', 3, '--log-interval', 1]



def model_state(path):
    return torch.load(path, map_location='cpu', weights_only=False)['model']


def assert_same_weights(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].double(), b[name].double(), atol=tol, rtol=0), name


def start_training(*args):
    return subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *map(str, args)], cwd=ROOT, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def read_until(process, pattern, timeout=120):
    """Read the run's stderr line by line until ``pattern`` matches; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f'{pattern!r} not seen; output:\n{"".join(lines)[-3000:]}')


@pytest.fixture(scope='module')
def straight_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('straight') / 'run'
    run_script('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, check=True)
    return run_dir


def test_kill_9_mid_epoch_then_resume_gives_the_same_weights(straight_run, tiny_data, tmp_path):
    run_dir = tmp_path / 'killed'
    process = start_training(*BASE, '--data-dir', tiny_data, '--output', run_dir)
    lines = read_until(process, r'epoch 1 step 5:')  # past the recovery checkpoint of step 3 of the second epoch
    process.kill()
    process.wait()
    last_step = max(int(m.group(1)) for line in lines if (m := re.search(r'epoch 1 step (\d+):', line)))
    recovery = torch.load(run_dir / 'recovery.pth', weights_only=False)
    assert recovery['epoch'] == 1 and last_step - recovery['step'] <= 3  # at most --recovery-interval repeated
    result = run_script('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto',
                        check=True)
    assert 'resuming from' in result.stderr and 'recovery.pth' in result.stderr
    assert_same_weights(model_state(run_dir / 'last.pth'), model_state(straight_run / 'last.pth'))
    assert [r['train_loss'] for r in read_summary(run_dir)][0] == read_summary(straight_run)[0]['train_loss']


def test_sigterm_writes_recovery_checkpoint_and_exits_75_within_a_step(tiny_data, tmp_path):
    run_dir = tmp_path / 'preempted'
    process = start_training(*BASE, '--data-dir', tiny_data, '--output', run_dir, '--recovery-interval', 0)
    lines = read_until(process, r'epoch 0 step 2:')
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 75, rest[-2000:]
    signalled_at = max(int(m.group(1)) for line in lines if (m := re.search(r'epoch 0 step (\d+):', line)))
    recovery = torch.load(run_dir / 'recovery.pth', weights_only=False)
    assert recovery['epoch'] == 0 and signalled_at <= recovery['step'] <= signalled_at + 1
    assert re.search(r'stopped: SIGTERM at epoch 0 step \d+: recovery checkpoint in', rest)
    assert 'Traceback' not in rest


def test_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
    state = {'model': {'w': torch.ones(3)}, 'optimizer': {}, 'epoch': 1, 'step': 4}
    save_checkpoint(state, tmp_path / 'recovery.pth')
    save_checkpoint({**state, 'epoch': 2, 'step': 0}, tmp_path / 'last.pth')
    time.sleep(0.01)
    data = (tmp_path / 'last.pth').read_bytes()
    (tmp_path / 'last.pth').write_bytes(data[:len(data) // 2])  # a crash half way through a non-atomic write
    path, loaded = find_resume_checkpoint(tmp_path)
    assert path.name == 'recovery.pth' and (loaded['epoch'], loaded['step']) == (1, 4)
    assert 'skipping cannot read checkpoint' in caplog.text and 'last.pth' in caplog.text


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint({'model': {'w': torch.zeros(2)}}, tmp_path / 'last.pth')
    before = (tmp_path / 'last.pth').read_bytes()

    def disk_full(obj, f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(UsageError, match='No space left on device; the previous checkpoint is intact'):
        save_checkpoint({'model': {'w': torch.ones(2)}}, tmp_path / 'last.pth')
    assert (tmp_path / 'last.pth').read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth']


@pytest.fixture
def poisoned_loss(monkeypatch):
    """Make the training loss NaN at the given (1-based) training steps."""
    steps, calls = set(), [0]
    original = PowerGradCrossEntropy.forward

    def forward(self, logits, target):
        calls[0] += 1
        loss = original(self, logits, target)
        return loss * float('nan') if calls[0] in steps else loss

    monkeypatch.setattr(PowerGradCrossEntropy, 'forward', forward)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield steps
    for s, handler in handlers.items():
        signal.signal(s, handler)


def test_one_non_finite_step_is_skipped_and_counted(poisoned_loss, tiny_data, tmp_path, caplog):
    poisoned_loss.add(4)
    run_dir = tmp_path / 'one'
    assert train.main([*map(str, BASE), '--data-dir', str(tiny_data), '--output', str(run_dir), '--workers', '0']) == 0
    rows = read_summary(run_dir)
    assert [int(r['train_skipped_steps']) for r in rows] == [1, 0]
    assert all(float(r['train_loss']) == float(r['train_loss']) for r in rows)  # the NaN never entered the mean
    assert 'epoch 0 step 4: 1 step(s) skipped so far this epoch' in caplog.text


def test_k_consecutive_non_finite_steps_stop_the_run_keeping_the_last_good_checkpoint(poisoned_loss, tiny_data,
                                                                                       tmp_path):
    poisoned_loss.update({14, 15, 16})  # steps 4-6 of the second epoch
    run_dir = tmp_path / 'diverged'
    argv = [*map(str, BASE), '--data-dir', str(tiny_data), '--output', str(run_dir), '--workers', '0',
            '--max-skipped-steps', '3', '--recovery-interval', '0']
    with pytest.raises(TrainingDiverged, match='3 consecutive steps with a non-finite loss or gradient at epoch 1'):
        train.main(argv)
    last = torch.load(run_dir / 'last.pth', weights_only=False)
    assert last['epoch'] == 1 and all(torch.isfinite(v).all() for v in last['model'].values() if v.is_floating_point())
    assert TrainingDiverged.exit_code == 3 and Preempted.exit_code == 75


def corrupt(path):
    path.write_bytes(path.read_bytes()[:150])


def test_corrupt_training_image_is_replaced_and_counted(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    broken = sorted((data / 'train').glob('*/*.JPEG'))[7]
    corrupt(broken)
    result = run_script('train.py', *BASE, '--data-dir', data, '--output', tmp_path / 'run', check=True)
    assert [int(r['train_unreadable']) for r in read_summary(tmp_path / 'run')] == [1, 1]
    assert f'cannot read image {broken}' in result.stderr and 'using the next image' in result.stderr


def test_validation_reports_unreadable_images(tiny_data, tmp_path, straight_run):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    corrupt(sorted((data / 'val').glob('*/*.JPEG'))[0])
    result = run_script('validate.py', '--checkpoint', straight_run / 'last.pth', '--data-dir', data, check=True)
    assert re.search(r'images\s+79', result.stdout) and re.search(r'unreadable\s+1', result.stdout)


def test_slurm_scripts_parse():
    for script in ('scripts/slurm_train.sbatch', 'scripts/slurm_step.sh'):
        assert subprocess.run(['bash', '-n', str(ROOT / script)]).returncode == 0, script


def test_torchrun_restarts_a_killed_rank_from_its_recovery_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / 'elastic'
    agent = subprocess.Popen(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '--max-restarts', '1',
         str(ROOT / 'train.py'), *map(str, BASE), '--data-dir', str(tiny_data), '--output', str(run_dir),
         '--global-batch-size', '32', '--workers', '0', '--resume', 'auto'],
        cwd=ROOT, text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        env={**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'})
    read_until(agent, r'epoch 0 step 4:')  # rank 0 logs; the recovery checkpoint of step 3 exists
    ranks = subprocess.run(['pgrep', '-P', str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[-1]), signal.SIGKILL)
    _, rest = agent.communicate(timeout=300)
    assert agent.returncode == 0, rest[-3000:]
    assert 'recovery.pth' in rest and 'resuming from' in rest
    assert [int(r['epoch']) for r in read_summary(run_dir)] == [0, 1]
