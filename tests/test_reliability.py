"""Preemption and crashes as a cluster delivers them: signals to whole process groups (DataLoader workers included),
kill -9 mid-epoch, torchrun restarting a killed rank; non-finite steps and unreadable images."""
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from pgt import train
from conftest import (BASE, ROOT, STEP_LINE, assert_same_weights, copy_run, file_digests, model_state,
                      one_line_error, read_until, run_main, start_training, summary_values, torchrun_command)
from pgt.checkpoint import find_resume_checkpoint, save_checkpoint
from pgt.runlog import read_summary


def last_step(lines, epoch):
    return max(int(m.group(2)) for line in lines if (m := re.search(STEP_LINE, line)) and int(m.group(1)) == epoch)


def test_kill_9_mid_epoch_then_resume_gives_the_same_weights(straight_run, tiny_data, tmp_path):
    run_dir = tmp_path / 'killed'
    process = start_training(*BASE, '--data-dir', tiny_data, '--output', run_dir)
    lines = read_until(process, r'epoch 1/1 step 5/')  # past the recovery checkpoint of step 3 of the second epoch
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    recovery = torch.load(run_dir / 'recovery.pth', weights_only=True)
    assert recovery['epoch'] == 1 and last_step(lines, 1) - recovery['step'] <= 3  # <= --recovery-interval repeated
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto',
                      check=True)
    assert 'resuming from' in result.stderr and 'recovery.pth' in result.stderr
    assert f'images listed by {run_dir}/index/train.npz' in result.stderr  # the restart read the saved index
    assert_same_weights(model_state(run_dir / 'last.pth'), model_state(straight_run / 'last.pth'))
    assert summary_values(run_dir) == summary_values(straight_run)


def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(straight_run, tiny_data, tmp_path):
    """SLURM and a terminal signal the whole group: the 2 DataLoader workers get SIGTERM too and must not take the
    run down before it saves."""
    run_dir = tmp_path / 'preempted'
    process = start_training(*BASE, '--data-dir', tiny_data, '--output', run_dir, '--recovery-interval', 0,
                             '--workers', 2)
    lines = read_until(process, r'epoch 1/1 step 2/')
    os.killpg(process.pid, signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 75, rest[-3000:]
    assert re.fullmatch(r'stopped: SIGTERM at epoch 1 step \d+: recovery checkpoint in .*; continue with '
                        r'--resume auto', one_line_error(rest))
    assert 'killed by signal' not in rest
    recovery = torch.load(run_dir / 'recovery.pth', weights_only=True)
    assert recovery['epoch'] == 1 and last_step(lines, 1) <= recovery['step'] <= last_step(lines, 1) + 1
    run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto',
             '--recovery-interval', 0, '--workers', 2, check=True)
    assert_same_weights(model_state(run_dir / 'last.pth'), model_state(straight_run / 'last.pth'))
    assert summary_values(run_dir) == summary_values(straight_run)


@pytest.mark.slow
@pytest.mark.parametrize('stop', [signal.SIGUSR1, signal.SIGINT], ids=['SIGUSR1', 'SIGINT'])
def test_a_signal_to_torchruns_process_group_saves_exits_75_and_resumes_exactly(stop, straight_run_2_ranks, tiny_data,
                                                                               tmp_path):
    """The launcher is signalled with its group (SLURM's warning signal, a terminal's Ctrl-C); it forwards the signal
    to each rank's process group (workers included), where torchrun alone dies of SIGUSR1 (exit 138) or ends in its
    SignalException traceback. The ranks agree on the signal every --signal-check-interval (4) steps: both stop
    after the same step, a multiple of 4 within 4 steps of the signal, with one recovery checkpoint; the launcher
    exits with their code, 75, in one line. Resumed, the run ends as the uninterrupted one. Under SIGINT the storage
    is slow, as a loaded network filesystem is (every write of recovery.pth 4 s late): the stop checkpoint still fits
    the grace the launcher gives the ranks before it kills them (pgt.launch.STOP_GRACE_SECONDS)."""
    run_dir = tmp_path / 'preempted'
    two_ranks = [*BASE, '--data-dir', tiny_data, '--output', run_dir, '--global-batch-size', 32, '--workers', 2,
                 '--recovery-interval', 0, '--resume', 'auto', '--signal-check-interval', 4]
    command = torchrun_command(*two_ranks)
    if stop == signal.SIGINT:
        script = command.index(str(ROOT / 'train.py'))
        command[script:script + 1] = [str(ROOT / 'tests' / 'faulty_writes.py'), 'slow:recovery.pth:4']
    agent = start_training(command=command)
    seen = last_step(read_until(agent, r'epoch 0/1 step 3/'), 0)
    os.killpg(agent.pid, stop)
    _, rest = agent.communicate(timeout=120)
    stops = re.findall(rf'stopped: {stop.name} at epoch 0 step (\d+): recovery checkpoint', rest)
    assert len(stops) == 2 and stops[0] == stops[1], rest[-3000:]
    step = int(stops[0])
    assert step % 4 == 0 and step - seen <= 4 + 1, (seen, step)  # +1: the step running when the signal lands
    assert 'killed by signal' not in rest and 'Unable to shutdown process' not in rest, rest[-3000:]
    assert agent.returncode == 75 and 'Traceback' not in rest, rest[-3000:]
    assert rest.strip().splitlines()[-1] == f'pgt-torchrun: {stop.name}: the ranks exited with code 75'
    assert torch.load(run_dir / 'recovery.pth', weights_only=True)['step'] == step
    if stop == signal.SIGUSR1:
        result = subprocess.run(torchrun_command(*two_ranks), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_weights(model_state(run_dir / 'last.pth'), model_state(straight_run_2_ranks / 'last.pth'))
        assert summary_values(run_dir) == summary_values(straight_run_2_ranks)


@pytest.mark.slow
def test_a_final_failure_is_not_run_again_by_torchruns_restarts(tiny_data, tmp_path):
    """--max-restarts restarts the ranks after any failure. Bad input fails the same way every time: the restarted
    ranks repeat the line and the code at once, without starting again, and the launcher exits 2."""
    result = subprocess.run(torchrun_command(*BASE, '--data-dir', tmp_path / 'no-such-data', '--output',
                                             tmp_path / 'run', max_restarts=1), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count(' pgt 0.3.0 (') == 1  # the first attempt's start-up line: rank 0, once
    assert result.stderr.count(f'error: data directory not found: {tmp_path}/no-such-data (not run again: an '
                               f'earlier attempt of this torchrun run ended so)') == 2  # the restart's two ranks
    assert not (tmp_path / 'run').exists()


def _agreement_worker(rank, init_file, result_file):
    import torch.distributed as dist
    from pgt.preemption import PreemptionFlag
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    calls, reduce = [], dist.all_reduce

    def counted(*args, **kwargs):  # observes the collective; the decision to make it is PreemptionFlag's
        calls.append(step)
        return reduce(*args, **kwargs)
    dist.all_reduce = counted
    flag = PreemptionFlag(agree_every=4)
    flag.training_started()
    answers = []
    for step in range(1, 11):
        if rank == 1 and step == 5:
            flag.signal_name = 'SIGTERM'  # rank 1 gets the signal during step 5
        answers.append(flag.requested(step, steps_in_epoch=10))
    if rank == 0:
        Path(result_file).write_text(f'{calls}\n{answers}')
    dist.barrier()
    dist.destroy_process_group()
    # Leave at once: gloo's threads were seen to abort the interpreter's teardown under load ("terminate called
    # without an active exception"), after the result above is written.
    os._exit(0)


def test_ranks_agree_on_a_signal_every_k_steps_and_at_the_epoch_end(tmp_path):
    result = tmp_path / 'result.txt'
    torch.multiprocessing.spawn(_agreement_worker, args=(str(tmp_path / 'init'), str(result)), nprocs=2)
    calls, answers = result.read_text().splitlines()
    assert calls == '[4, 8, 10]'  # one all-reduce every 4 steps and at the last step, none in between
    # rank 0 never got the signal, yet stops with rank 1 at the first agreement after it: step 8
    assert answers == str([False] * 7 + [True, False, True])


@pytest.mark.slow
def test_torchrun_restart_after_a_killed_rank_reproduces_weights_and_every_metric(straight_run_2_ranks, tiny_data,
                                                                                   tmp_path):
    """Each rank saves and restores its own partial-epoch meters: the resumed epoch's train loss and top-1 are those
    of the uninterrupted run, not rank 0's half counted twice."""
    run_dir = tmp_path / 'elastic'
    agent = start_training(command=torchrun_command(*BASE, '--data-dir', tiny_data, '--output', run_dir,
                                                    '--global-batch-size', 32, '--workers', 0, '--resume', 'auto',
                                                    max_restarts=1))
    read_until(agent, r'epoch 1/1 step 5/')  # mid second epoch; the recovery checkpoint of step 3 exists
    ranks = subprocess.run(['pgrep', '-P', str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[-1]), signal.SIGKILL)
    _, rest = agent.communicate(timeout=300)
    assert agent.returncode == 0, rest[-3000:]
    assert 'resuming from' in rest and 'recovery.pth' in rest
    assert_same_weights(model_state(run_dir / 'last.pth'), model_state(straight_run_2_ranks / 'last.pth'))
    assert summary_values(run_dir) == summary_values(straight_run_2_ranks)


def test_signal_during_start_up_stops_with_one_line_and_changes_nothing(straight_run, tiny_data, tmp_path):
    run_dir = copy_run(straight_run, tmp_path / 'run')
    (run_dir / 'last.pth').unlink()  # a run to continue: resume finds recovery.pth (epoch 1)
    before = file_digests(run_dir)
    process = start_training(*BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto')
    read_until(process, r'resuming from')  # start-up: the model is not built yet
    os.killpg(process.pid, signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 75
    assert one_line_error(rest).startswith('stopped: SIGTERM during start-up, before training began')
    assert file_digests(run_dir) == before


def test_checkpoint_furthest_along_is_resumed_and_truncated_ones_are_skipped(tmp_path, caplog):
    state = {'state_dict': {'w': torch.ones(3)}, 'args': {}, 'optimizer': {}, 'epoch': 1, 'step': 4,
             'epoch_steps': 10}
    save_checkpoint({**state, 'step': 10}, tmp_path / 'last.pth')  # the end of epoch 1
    save_checkpoint(state, tmp_path / 'recovery.pth')  # newer file, earlier position: a stale recovery checkpoint
    assert find_resume_checkpoint(tmp_path)[0].name == 'last.pth'
    data = (tmp_path / 'last.pth').read_bytes()
    (tmp_path / 'last.pth').write_bytes(data[:len(data) // 2])  # a crash half way through a non-atomic copy
    path, loaded = find_resume_checkpoint(tmp_path)
    assert path.name == 'recovery.pth' and (loaded['epoch'], loaded['step']) == (1, 4)
    assert 'skipping cannot read checkpoint' in caplog.text and 'last.pth' in caplog.text


def test_one_non_finite_step_is_skipped_and_counted(poisoned_loss, tiny_data, tmp_path, caplog):
    poisoned_loss.add(4)
    run_dir = tmp_path / 'one'
    assert train.main([*map(str, BASE), '--data-dir', str(tiny_data), '--output', str(run_dir), '--workers', '0']) == 0
    rows = read_summary(run_dir)
    assert [int(r['train_skipped_steps']) for r in rows] == [1, 0]
    assert all(float(r['train_loss']) == float(r['train_loss']) for r in rows)  # the NaN never entered the mean
    assert 'epoch 0 step 4: 1 step(s) skipped so far this epoch' in caplog.text


def test_consecutive_skips_are_counted_across_the_epoch_boundary(poisoned_loss, tiny_data, tmp_path):
    poisoned_loss.update({9, 10, 11, 12})  # the last two steps of epoch 0 and the first two of epoch 1
    run_dir = tmp_path / 'diverged'
    argv = [*map(str, BASE), '--data-dir', str(tiny_data), '--output', str(run_dir), '--workers', '0',
            '--max-skipped-steps', '4', '--recovery-interval', '0']
    with pytest.raises(train.TrainingDiverged, match=r'4 consecutive steps .* by epoch 1 step 2 .* the newest '
                                                     r'checkpoint is .*last.pth \(end of epoch 0\)'):
        train.main(argv)
    last = torch.load(run_dir / 'last.pth', weights_only=True)
    assert last['epoch'] == 0 and last['skip_streak'] == {'current': 2}
    assert all(torch.isfinite(v).all() for v in last['state_dict'].values() if v.is_floating_point())


def corrupt(path):
    path.write_bytes(path.read_bytes()[:150])


def test_corrupt_training_image_is_replaced_and_counted(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    broken = sorted((data / 'train').glob('*/*.JPEG'))[7]
    corrupt(broken)
    result = run_main('train.py', *BASE, '--data-dir', data, '--output', tmp_path / 'run', check=True)
    assert [int(r['train_unreadable']) for r in read_summary(tmp_path / 'run')] == [1, 1]
    assert f'cannot read image {broken}' in result.stderr and 'using the next image' in result.stderr


def test_validation_reports_unreadable_images(tiny_data, tmp_path, straight_run):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    corrupt(sorted((data / 'val').glob('*/*.JPEG'))[0])
    result = run_main('validate.py', '--checkpoint', straight_run / 'last.pth', '--data-dir', data, check=True)
    assert re.search(r'images\s+79', result.stdout) and re.search(r'unreadable\s+1', result.stdout)


def test_slurm_scripts_parse():
    for script in ('scripts/slurm_train.sbatch', 'scripts/slurm_step.sh'):
        assert subprocess.run(['bash', '-n', str(ROOT / script)]).returncode == 0, script


def test_recovery_checkpoint_position_is_reported_by_validate(straight_run, tiny_data):
    result = run_main('validate.py', '--checkpoint', straight_run / 'recovery.pth', '--data-dir', tiny_data,
                      '--json', check=True)
    assert '"epoch": 1, "step": 9' in result.stdout  # written at step 9 of epoch 1 (0-based epochs)
