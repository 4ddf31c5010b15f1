"""What must survive a failing machine: a full filesystem during a checkpoint write, a divergence, and kill -9 at each
of the writes of an epoch end. Each failure is real: a file size limit or a small tmpfs, a learning rate that
overflows, SIGKILL at the moment the named file is half written."""
import contextlib
import errno
import os
import resource
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pgt import train
from conftest import (BASE, ROOT, assert_same_weights, copy_run, file_digests, model_state, one_line_error, run_main,
                      run_script, summary_values, train_in_process, user_namespaces_work)
from pgt.checkpoint import save_checkpoint
from pgt.engine import BufferGuard, TrainingParts, make_scaler, train_step
from pgt.runlog import RunLog, read_summary

CHECKPOINTS = ('last.pth', 'best.pth', 'recovery.pth')


def first_epoch(first_epoch_run, run_dir):
    """A copy of a good first epoch (last.pth, best.pth, recovery.pth written): the digests of its checkpoints."""
    copy_run(first_epoch_run, run_dir)
    return {name: digest for name, digest in file_digests(run_dir).items() if name in CHECKPOINTS}


def assert_finite_checkpoints(run_dir):
    for path in run_dir.glob('*.pth'):
        for name, tensor in torch.load(path, weights_only=True)['state_dict'].items():
            assert not tensor.is_floating_point() or torch.isfinite(tensor).all(), (path.name, name)


# ---- a full filesystem

@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE on this process: a write beyond ``limit`` bytes fails with EFBIG (Python ignores SIGXFSZ), as on
    a filesystem whose quota is reached. The soft limit only: it is raised again afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_file_size_limit_during_a_checkpoint_write_keeps_the_previous_one(straight_run, first_epoch_run, tiny_data,
                                                                          tmp_path):
    run_dir = tmp_path / 'run'
    before = first_epoch(first_epoch_run, run_dir)
    limit = (run_dir / 'recovery.pth').stat().st_size // 2  # summary.csv, train.log and TensorBoard stay far below
    with file_size_limit(limit):
        result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto')
    assert result.returncode == 1
    assert one_line_error(result.stderr) == (f'error: could not write {run_dir}/recovery.pth: File too large; the '
                                             f'previous recovery.pth is intact')
    assert not list(run_dir.glob('.*.tmp'))
    assert {name: d for name, d in file_digests(run_dir).items() if name in CHECKPOINTS} == before
    run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto', check=True)
    assert_same_weights(model_state(run_dir / 'last.pth'), model_state(straight_run / 'last.pth'))
    assert summary_values(run_dir) == summary_values(straight_run)


@pytest.mark.skipif(not user_namespaces_work(), reason='a private tmpfs needs unshare -Urm (user and mount '
                                                       'namespaces), which this system does not allow')
def test_full_tmpfs_during_a_checkpoint_write_keeps_the_previous_one(straight_run, first_epoch_run, tiny_data,
                                                                     tmp_path):
    """A real ENOSPC: the run directory is a tmpfs that holds the first job's files (recovery.pth, and last.pth with
    best.pth as a hard link to it) with room for less than one more checkpoint, so the first write of the second job
    fills it."""
    run_dir, before, after = tmp_path / 'run', tmp_path / 'before', tmp_path / 'after'
    run_dir.mkdir()
    used = sum(p.stat().st_size for p in first_epoch_run.rglob('*') if p.is_file() and p.name != 'best.pth')
    size_kib = (used + (first_epoch_run / 'last.pth').stat().st_size // 2) // 1024 + 64  # + tmpfs block rounding
    # cp -a keeps best.pth a hard link to last.pth, as the first job wrote them.
    train_cmd = f'{sys.executable} train.py {" ".join(map(str, BASE))} --data-dir {tiny_data} --output {run_dir}'
    script = (f'set -e; mount -t tmpfs -o size={size_kib}k pgt-full-disk {run_dir}; '
              f'cp -a {first_epoch_run}/. {run_dir}; cp -a {run_dir} {before}; '
              f'set +e; {train_cmd} --resume auto 2>{tmp_path}/stderr; echo $? >{tmp_path}/rc; '
              f'cp -a {run_dir} {after}')
    subprocess.run(['unshare', '-Urm', 'sh', '-c', script], cwd=ROOT, check=True, timeout=600)
    stderr = (tmp_path / 'stderr').read_text()
    assert (tmp_path / 'rc').read_text().strip() == '1', stderr[-3000:]
    assert one_line_error(stderr) == (f'error: could not write {run_dir}/recovery.pth: No space left on device; the '
                                      f'previous recovery.pth is intact')
    assert not list(after.glob('.*.tmp'))
    kept = {name: digest for name, digest in file_digests(before).items() if name in CHECKPOINTS}
    assert {name: digest for name, digest in file_digests(after).items() if name in CHECKPOINTS} == kept
    run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', after, '--resume', 'auto', check=True)
    assert_same_weights(model_state(after / 'last.pth'), model_state(straight_run / 'last.pth'))


# ---- divergence

def test_divergence_stops_with_exit_3_and_never_writes_over_a_good_checkpoint(first_epoch_run, tiny_data, tmp_path):
    """The learning rate jumps to 1e4 after a good epoch: the activations overflow within a few steps and batch-norm
    running variances become inf while the loss is still finite. The run must stop before writing them."""
    run_dir = tmp_path / 'run'
    before = first_epoch(first_epoch_run, run_dir)
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto',
                      '--epochs', 4, '--lr', 1e4, '--warmup-epochs', 0, '--allow-config-change')
    assert result.returncode == 3
    line = one_line_error(result.stderr)
    assert 'non-finite' in line and f'the newest checkpoint is {run_dir}/last.pth (end of epoch 0)' in line
    assert {name: d for name, d in file_digests(run_dir).items() if name in CHECKPOINTS} == before
    assert_finite_checkpoints(run_dir)


def test_an_epoch_of_skipped_steps_stops_without_writing(poisoned_loss, first_epoch_run, tiny_data, tmp_path):
    """Every step of the second epoch is non-finite, yet no run of consecutive skips reaches the limit within it."""
    run_dir = tmp_path / 'run'
    before = first_epoch(first_epoch_run, run_dir)
    poisoned_loss.update(range(1, 11))  # the ten steps of epoch 1 in this process
    argv = [*map(str, BASE), '--data-dir', str(tiny_data), '--output', str(run_dir), '--workers', '0',
            '--resume', 'auto', '--max-skipped-steps', '100', '--epochs', '4', '--allow-config-change']
    with pytest.raises(train.TrainingDiverged, match=r'every step of epoch 1 had a non-finite loss or gradient'):
        train.main(argv)
    after = file_digests(run_dir)
    assert after['last.pth'] == before['last.pth'] and after['best.pth'] == before['best.pth']
    # recovery.pth moved on within the epoch (steps 3, 6, 9), holding the weights of the last finite step:
    recovery = torch.load(run_dir / 'recovery.pth', weights_only=True)
    assert (recovery['epoch'], recovery['step']) == (1, 9)
    assert_same_weights(recovery['state_dict'], model_state(run_dir / 'last.pth'), tol=0)
    assert_finite_checkpoints(run_dir)


def test_a_skipped_step_leaves_weights_optimizer_and_batch_norm_statistics_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    parts = TrainingParts(model, torch.nn.CrossEntropyLoss(), optimizer, make_scaler(torch.device('cpu'), None),
                          buffer_guard=BufferGuard(model))
    images, targets = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    train_step(parts, [(images, targets)], torch.device('cpu'))  # a finite step: momentum buffers exist now

    def snapshot():
        return ({k: v.clone() for k, v in model.state_dict().items()},
                [s['momentum_buffer'].clone() for s in optimizer.state.values()], parts.scaler.get_scale())

    weights, momenta, scale = snapshot()
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float('nan')  # NaN activations: the forward pass alone would poison running_mean/var
    *_, grad_norm = train_step(parts, [(poisoned, targets)], torch.device('cpu'))
    assert not torch.isfinite(grad_norm)
    after_weights, after_momenta, after_scale = snapshot()
    for name in weights:
        assert torch.equal(after_weights[name], weights[name]), name
    assert all(torch.equal(a, b) for a, b in zip(after_momenta, momenta)) and after_scale == scale
    train_step(parts, [(images, targets)], torch.device('cpu'))
    assert not torch.equal(model[1].running_mean, weights['1.running_mean'])  # a finite step does change them
    assert int(model[1].num_batches_tracked) == int(weights['1.num_batches_tracked']) + 1


# ---- kill -9 at each write of an epoch end

EPOCH_END_WRITES = ['summary.csv', 'best.pth', 'epoch_0.pth', 'last.pth']


@pytest.mark.slow
@pytest.mark.parametrize('first_crash', EPOCH_END_WRITES)
def test_kill_9_during_each_epoch_end_write_then_resume(first_crash, straight_run, tiny_data, tmp_path):
    """SIGKILL half-way through writing ``first_crash`` at the end of epoch 0 (after last.pth, once more: half-way
    through the second write of last.pth, at the end of epoch 1, of the resumed job), then a resume to the end:
    best.pth, last.pth and summary.csv are those of the uninterrupted run, and no temporary file is left."""
    run_dir = tmp_path / 'run'
    args = [*BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto', '--checkpoint-interval', 1]
    crashes = [f'{first_crash}:1'] + (['last.pth:2'] if first_crash == 'last.pth' else [])
    for crash in crashes:
        result = run_script('tests/faulty_writes.py', f'kill:{crash}', *args)
        assert result.returncode == -9, result.stderr[-3000:]
        assert (run_dir / f'.{crash.partition(":")[0]}.tmp').exists()  # killed during that very write
    run_main('train.py', *args, check=True)
    assert not list(run_dir.glob('.*.tmp'))
    assert summary_values(run_dir) == summary_values(straight_run)
    best, straight_best = (torch.load(d / 'best.pth', weights_only=True) for d in (run_dir, straight_run))
    assert best['best'] == straight_best['best'] and best['epoch'] == straight_best['epoch']
    assert_same_weights(best['state_dict'], straight_best['state_dict'])
    assert_same_weights(model_state(run_dir / 'last.pth'), model_state(straight_run / 'last.pth'))
    assert sorted(p.name for p in run_dir.glob('epoch_*.pth')) == ['epoch_0.pth', 'epoch_1.pth']


def test_a_tensorboard_failure_is_one_warning_and_the_summary_is_still_written(tmp_path, caplog):
    (tmp_path / 'tb').write_text('a file where TensorBoard wants its folder')
    runlog = RunLog(tmp_path, enabled=True)
    runlog.start_epoch(0, 1, 1)
    runlog.step(1, SimpleNamespace(step=1, images=8, data_seconds=0.0), {'loss': 1.5})
    runlog.end_epoch(0, {'loss': 1.5, 'top1': 50.0, 'img_per_sec': 10.0}, {'loss': 2.5, 'top1': 40.0, 'top5': 90.0},
                     0.1)
    runlog.close()
    assert caplog.text.count('TensorBoard logging stopped') == 1
    assert read_summary(tmp_path) == [{'epoch': '0', 'train_loss': '1.5', 'train_top1': '50.0',
                                       'train_img_per_sec': '10.0', 'eval_loss': '2.5', 'eval_top1': '40.0',
                                       'eval_top5': '90.0', 'lr': '0.1'}]


# ---- one write per epoch end: best.pth and epoch_N.pth are hard links to last.pth's file

def test_the_epoch_end_files_are_one_file_linked_under_each_name(tiny_data, tmp_path):
    run_dir = tmp_path / 'run'
    train_in_process(*BASE, '--data-dir', tiny_data, '--output', run_dir, '--epochs', 1, '--checkpoint-interval', 1,
                     '--recovery-interval', 0, '--workers', 0, '--pgt-start-epoch', 0)
    names = ('best.pth', 'epoch_0.pth', 'last.pth')
    inodes = {os.stat(run_dir / name).st_ino for name in names}
    assert len(inodes) == 1 and os.stat(run_dir / 'last.pth').st_nlink == 3
    state = torch.load(run_dir / 'best.pth', weights_only=True)
    assert (state['epoch'], state['step'], state['epoch_steps']) == (0, 10, 10) and not list(run_dir.glob('.*.tmp'))


def test_without_hard_links_each_name_gets_a_full_copy(tmp_path, monkeypatch):
    """Some network and FUSE filesystems refuse links (EPERM): the state is then written under each name."""
    def no_links(source, target):
        raise OSError(errno.EPERM, 'Operation not permitted')
    monkeypatch.setattr(os, 'link', no_links)
    state = {'state_dict': {'w': torch.arange(5.0)}, 'args': {}, 'epoch': 1, 'step': 0}
    save_checkpoint(state, [tmp_path / 'best.pth', tmp_path / 'last.pth'])
    best, last = (tmp_path / name for name in ('best.pth', 'last.pth'))
    assert best.read_bytes() == last.read_bytes() and os.stat(best).st_ino != os.stat(last).st_ino
    assert torch.equal(torch.load(best, weights_only=True)['state_dict']['w'], torch.arange(5.0))
    assert not list(tmp_path.glob('.*.tmp'))
