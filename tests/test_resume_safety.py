"""--resume must continue this run and nothing else: not a run whose checkpoints are all damaged (by starting over it),
not another configuration's checkpoints, not another architecture's, and never a file that runs code when loaded."""
import os

import pytest
import torch

from conftest import (BASE, assert_same_weights, copy_run, file_digests, model_state, one_line_error, run_main,
                      run_script)


@pytest.fixture
def run_copy(straight_run, tmp_path):
    """A finished run (last.pth, best.pth, recovery.pth, summary.csv) that a test may damage."""
    return copy_run(straight_run, tmp_path / 'run')


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])


def test_resume_auto_refuses_a_run_whose_checkpoints_are_all_unreadable(run_copy, tiny_data):
    for name in ('last.pth', 'best.pth', 'recovery.pth'):
        truncate(run_copy / name)
    before = file_digests(run_copy)
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_copy, '--resume', 'auto')
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert line.startswith(f'error: {run_copy} holds checkpoints but none is readable (cannot read checkpoint')
    assert line.endswith('move them away, or pass --overwrite to start the run again')
    assert file_digests(run_copy) == before


def test_resume_auto_falls_back_to_an_intact_best_checkpoint(run_copy, straight_run, tiny_data):
    """best.pth holds a full state (end of epoch 0 here): the run repeats epoch 1 and ends where it ended."""
    truncate(run_copy / 'last.pth')
    truncate(run_copy / 'recovery.pth')
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_copy, '--resume', 'auto',
                      check=True)
    assert f'resuming from {run_copy}/best.pth' in result.stderr
    assert_same_weights(model_state(run_copy / 'last.pth'), model_state(straight_run / 'last.pth'))


def test_resume_refuses_another_configuration_unless_asked(run_copy, tiny_data):
    (run_copy / 'last.pth').unlink()  # continue from recovery.pth (epoch 1, step 9)
    before = file_digests(run_copy)
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_copy, '--resume', 'auto',
                      '--lr', 0.2, '--smoothing', 0.1)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (
        f'error: {run_copy}/recovery.pth was written under another configuration (lr: 0.1 -> 0.2; smoothing: 0.0 -> '
        f'0.1); pass --allow-config-change to continue it anyway, or --output elsewhere for a new run')
    assert file_digests(run_copy) == before
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_copy, '--resume', 'auto',
                      '--lr', 0.2, '--workers', 0, '--allow-config-change', check=True)
    assert 'continuing' in result.stderr and 'lr: 0.1 -> 0.2' in result.stderr


def test_a_run_of_an_earlier_version_resumes_without_the_options_added_since(run_copy, tiny_data):
    """A checkpoint whose configuration predates --schedule-origin, --pgt-impl and --train-img-sizes resumes: the
    run trained as their defaults do. Setting one away from its default is still a change."""
    path = run_copy / 'recovery.pth'
    (run_copy / 'last.pth').unlink()
    state = torch.load(path, map_location='cpu', weights_only=True)
    added = ('schedule_origin', 'pgt_impl', 'train_img_sizes', 'train_size_probs', 'train_size_schedule',
             'train_size_schedule_spread', 'train_size_random_mix')
    assert set(added) - {'train_img_sizes', 'train_size_probs'} <= set(state['args'])  # None values are not saved
    state['args'] = {key: value for key, value in state['args'].items() if key not in added}
    torch.save(state, path)
    changed = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_copy, '--resume', 'auto',
                       '--pgt-impl', 'hook')
    assert one_line_error(changed.stderr).endswith('(pgt_impl: exact -> hook); pass --allow-config-change to continue '
                                                   'it anyway, or --output elsewhere for a new run')
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_copy, '--resume', 'auto', check=True)
    assert f'resuming from {path}' in result.stderr and 'changed configuration' not in result.stderr


def test_overwrite_removes_the_old_run_so_a_crash_cannot_resume_it(run_copy, tiny_data):
    """--overwrite with a new configuration, killed before its first checkpoint: --resume auto then starts the new
    run from scratch, rather than continuing the old run's recovery.pth under the new configuration."""
    args = [*BASE, '--data-dir', tiny_data, '--output', run_copy, '--lr', 0.05]
    killed = run_script('tests/faulty_writes.py', 'kill:recovery.pth:1', *args, '--overwrite')
    assert killed.returncode == -9
    assert not [p.name for p in run_copy.glob('*.pth')]
    result = run_main('train.py', *args, '--resume', 'auto', '--epochs', 1, '--pgt-start-epoch', 0, check=True)
    assert 'no checkpoint in' in result.stderr and 'new run' in result.stderr
    assert torch.load(run_copy / 'last.pth', weights_only=True)['args']['lr'] == 0.05


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint could do to a machine that loads it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_a_crafted_checkpoint_is_refused_without_running_its_code(straight_run, tiny_data, tmp_path):
    marker = tmp_path / 'code-ran'
    crafted = tmp_path / 'crafted.pth'
    state = torch.load(straight_run / 'last.pth', weights_only=True)
    torch.save({**state, 'args': RunsCode(marker)}, crafted)
    for script, args in (('validate.py', ['--checkpoint', crafted]),
                         ('train.py', [*BASE, '--resume', crafted, '--output', tmp_path / 'run'])):
        result = run_main(script, *args, '--data-dir', tiny_data)
        assert result.returncode == 2, script
        assert one_line_error(result.stderr) == (
            f'error: cannot read checkpoint {crafted}: it holds a Python object (posix.system) that a checkpoint of '
            f'this suite never holds, so it was not loaded (it could run code)')
        assert not marker.exists()
    assert not (tmp_path / 'run').exists()


def test_every_checkpoint_loads_with_weights_only(straight_run):
    for path in sorted(straight_run.glob('*.pth')):
        state = torch.load(path, weights_only=True)
        assert {'state_dict', 'arch', 'optimizer', 'scaler', 'epoch', 'step', 'ranks', 'classes'} <= state.keys(), \
            path.name


def test_a_checkpoint_of_another_architecture_is_one_line_naming_both(straight_run, tiny_data, tmp_path):
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--resume', straight_run / 'last.pth',
                      '--output', tmp_path / 'run', '--model', 'resnet34')
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (f'error: {straight_run}/last.pth holds a test_resnet checkpoint; this '
                                             f'run builds a resnet34')
    assert not (tmp_path / 'run').exists()
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--resume', straight_run / 'last.pth',
                      '--output', tmp_path / 'run', '--num-classes', 5, '--allow-config-change')
    assert result.returncode == 2
    assert one_line_error(result.stderr).startswith(
        f'error: {straight_run}/last.pth does not fit a test_resnet with 5 classes (size mismatch for fc.weight')
