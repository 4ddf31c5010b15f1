"""Input that must be refused, or read only as it is meant: links that would relabel images, a val/ tree of other
classes than the model's, an image DALI cannot decode, and every bad value that once gave a traceback or passed.
Each refusal is exit code 2, one line, and nothing on disk changed."""
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from conftest import (BASE, ROOT, TINY, copy_run, file_digests, one_line_error, read_until, run_main, start_training,
                      user_namespaces_work)
from pgt.data import ImageFolderWithRecovery
from pgt.folders import scan_image_folder, split_index



def dali_installed() -> bool:
    try:
        return importlib.util.find_spec('nvidia.dali') is not None
    except ModuleNotFoundError:  # no 'nvidia' package at all
        return False


needs_dali = pytest.mark.skipif(not dali_installed(),
                                reason='NVIDIA DALI is not installed (an optional backend: requirements-dali.txt)')
BACKENDS = [['--data-backend', 'torch'],
            pytest.param(['--data-backend', 'dali', '--dali-device', 'cpu'], marks=needs_dali, id='dali')]


# ---- links in the data tree

def regular_images(split_dir):
    """The reference: every image that is a regular file under its own class folder, labelled by that folder,
    found by a walk that follows no link at all."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    return classes, sorted((os.path.join(root, f), label) for label, name in enumerate(classes)
                           for root, _, files in os.walk(split_dir / name)
                           for f in files if f.lower().endswith(IMG_EXTENSIONS)
                           and not os.path.islink(os.path.join(root, f)))


@pytest.fixture
def linked_tree(tiny_data, tmp_path):
    """The tiny set with, in train/<class 0>/: a file link to an image of class 1, a folder link to class 2, and one
    link out of the tree (a shared store), which must be followed. Returns (data dir, torchvision's samples)."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    train = data / 'train'
    first, second, third = sorted(d for d in train.iterdir())[:3]
    (first / 'other.JPEG').symlink_to(next(second.glob('*.JPEG')))
    (first / 'other_class').symlink_to(third, target_is_directory=True)
    store = tmp_path / 'store'
    store.mkdir()
    shutil.copy(next(first.glob('*.JPEG')), store / 'shared.JPEG')
    (first / 'from_store.JPEG').symlink_to(store / 'shared.JPEG')
    return data


def add_loops(class_dir):
    """A link to the split folder and one to the class folder itself: ImageFolder's walk would never end."""
    (class_dir / 'whole_split').symlink_to(class_dir.parent, target_is_directory=True)
    (class_dir / 'nested').mkdir()
    (class_dir / 'nested' / 'loop').symlink_to(class_dir, target_is_directory=True)


def test_links_are_not_followed_into_other_classes(linked_tree, caplog):
    split = linked_tree / 'train'
    classes, reference = regular_images(split)
    first = split / classes[0]
    torchvision_samples = ImageFolder(str(split)).samples
    relabelled = (os.path.join(first, 'other.JPEG'), os.path.join(first, 'other_class') + os.sep)
    assert any(path.startswith(relabelled) for path, _ in torchvision_samples)  # what ImageFolder does
    add_loops(first)
    index = scan_image_folder(split)
    found_classes, samples = index.classes, index.samples()
    assert found_classes == classes
    assert sorted(samples) == sorted(reference + [(os.path.join(first, 'from_store.JPEG'), 0)])
    assert samples == [s for s in torchvision_samples if not s[0].startswith(relabelled)]  # ImageFolder's order
    assert '4 symbolic link(s) not followed' in caplog.text
    assert 'other.JPEG' in caplog.text and '(a loop)' in caplog.text
    dataset = ImageFolderWithRecovery(index, None, replace=True, strict=False, image_size=32)
    assert [dataset[i][1] for i in range(len(dataset))] == [label for _, label in samples]
    listed = split_index(SimpleNamespace(data_dir=linked_tree), 'train')  # every backend's list
    assert listed.samples() == samples and listed.classes == classes


# ---- a val/ tree whose classes are not the model's

@pytest.fixture
def renamed_val(tiny_data, tmp_path):
    """The same number of val/ classes, one of them named differently from train/ and from the checkpoint."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    first = sorted((data / 'val').iterdir())[0]
    first.rename(first.with_name('n99999999'))
    return data


@pytest.mark.parametrize('backend', BACKENDS)
def test_training_refuses_val_classes_other_than_train_classes(backend, renamed_val, tmp_path):
    result = run_main('train.py', *BASE, '--data-dir', renamed_val, '--output', tmp_path / 'run', *backend)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (f'error: {renamed_val}/val: class folders differ from those of train/ '
                                             f'(10 vs 10 classes; e.g. n00000000, n99999999)')
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('backend', BACKENDS)
def test_validate_refuses_val_classes_other_than_the_checkpoints(backend, renamed_val, straight_run):
    result = run_main('validate.py', '--checkpoint', straight_run / 'last.pth', '--data-dir', renamed_val, *backend)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (f'error: {renamed_val}/val: class folders differ from those of the '
                                             f'checkpoint {straight_run}/last.pth (10 vs 10 classes; e.g. n00000000, '
                                             f'n99999999)')


def test_resume_refuses_train_classes_other_than_the_checkpoints(straight_run, tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    for split in ('train', 'val'):
        first = sorted((data / split).iterdir())[0]
        first.rename(first.with_name('n99999999'))
    run_dir = copy_run(straight_run, tmp_path / 'run')
    before = file_digests(run_dir)
    result = run_main('train.py', *BASE, '--data-dir', data, '--output', run_dir, '--resume', 'auto')
    assert result.returncode == 2
    assert one_line_error(result.stderr).startswith(f'error: {data}/train: class folders differ from those of the '
                                                    f'checkpoint {run_dir}/last.pth')
    assert file_digests(run_dir) == before


# ---- an image DALI cannot decode

@needs_dali
def test_dali_names_an_undecodable_image_and_leaves_nothing_that_blocks_the_rerun(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    broken = sorted((data / 'train').glob('*/*.JPEG'))[5]
    good = broken.read_bytes()
    broken.write_bytes(good[:150])
    args = [*BASE, '--data-dir', data, '--output', tmp_path / 'run', '--data-backend', 'dali', '--dali-device', 'cpu',
            '--epochs', 1, '--pgt-start-epoch', 0, '--recovery-interval', 0]
    result = run_main('train.py', *args)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert line.startswith(f'error: cannot read image {broken}: ') and 'use --data-backend torch' in line
    broken.write_bytes(good)
    run_main('train.py', *args, check=True)  # the same command again, once the file is replaced


# ---- bad values: exit 2, one line, nothing written

def refused(tmp_path, *args, recipe=None):
    """Run train.py on a copy of a finished run's directory; return its one error line, asserting exit 2 and that
    the directory is unchanged."""
    config = []
    if recipe is not None:
        (tmp_path / 'recipe.yaml').write_text(f'base: {TINY}\n{recipe}\n')
        config = ['--config', tmp_path / 'recipe.yaml']
    before = file_digests(tmp_path)
    result = run_main('train.py', *BASE, *config, '--data-dir', tmp_path / 'no-data-needed', *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert file_digests(tmp_path) == before
    return one_line_error(result.stderr)


def test_bad_values_are_one_line_errors_naming_where_they_came_from(tmp_path):
    assert refused(tmp_path, '--lr', -0.1) == 'error: --lr: must be > 0, got -0.1'
    assert refused(tmp_path, recipe='lr: .nan') == f"error: {tmp_path}/recipe.yaml: key 'lr': must be a finite " \
                                                   f"number, got nan"
    assert refused(tmp_path, '--pgt-start-epoch', 2) == ('error: --pgt-start-epoch: 2 is not an epoch of this run '
                                                          '(0-1), so PGT would never be applied')
    assert refused(tmp_path, '--momentum', 1) == 'error: --momentum: must be in [0, 1), got 1.0'
    assert refused(tmp_path, '--scale', 0.9, 0.2) == 'error: --scale: the minimum is above the maximum: [0.9, 0.2]'
    assert refused(tmp_path, '--workers', -1) == 'error: --workers: must be >= 0, got -1'


def test_output_that_is_a_file_or_cannot_be_written(tiny_data, tmp_path):
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('keep me')
    assert refused(tmp_path, '--data-dir', tiny_data, '--output', a_file) == \
        f'error: --output {a_file} is a file, not a directory'
    assert refused(tmp_path, '--data-dir', tiny_data, '--output', a_file / 'run') == \
        f'error: cannot write to --output {a_file}/run: Not a directory'
    assert a_file.read_text() == 'keep me'


def test_read_only_output_directory(tiny_data, tmp_path):
    if not user_namespaces_work():
        pytest.skip('a read-only mount needs unshare -Urm (user and mount namespaces), which this system does not '
                    'allow; as root, file permissions cannot make a directory unwritable')
    read_only = tmp_path / 'read-only'
    read_only.mkdir()
    command = (f'mount -t tmpfs -o ro pgt-read-only {read_only} && exec {sys.executable} train.py '
               f'{" ".join(map(str, BASE))} --data-dir {tiny_data} --output {read_only}/run')
    result = subprocess.run(['unshare', '-Urm', 'sh', '-c', command], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert one_line_error(result.stderr) == f'error: cannot write to --output {read_only}/run: Read-only file system'


@pytest.mark.slow
def test_sync_batch_norm_on_cpu_ranks_is_refused_in_one_line(tiny_data, tmp_path):
    """torch's SyncBatchNorm runs on CUDA only: two CPU ranks with --sync-bn stop before anything is written."""
    from conftest import torchrun_command
    result = subprocess.run(torchrun_command(*BASE, '--data-dir', tiny_data, '--output', tmp_path / 'run',
                                             '--global-batch-size', 32, '--workers', 0, '--sync-bn'),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    refusal = ("error: --sync-bn: torch's SyncBatchNorm runs on CUDA devices only, and this run is on the cpu; "
               "leave it out")
    assert result.stderr.count(refusal) == 2  # each rank once (their lines may interleave on the shared stderr)
    # No frame of ours (pgt/<module>.py, or train.py in a checkout named pgt): the traceback there is torchrun's
    # agent's, whose summary names the script it launched (.../pgt/train.py FAILED where the checkout is named pgt).
    assert not re.search(r'File "[^"]*/pgt/\w+\.py"', result.stderr), result.stderr[-3000:]
    assert not (tmp_path / 'run').exists()


def test_validate_refuses_unusable_values_in_one_line(straight_run, tiny_data):
    """0 is not "the checkpoint's value": every value given is checked, none replaced."""
    common = ['--checkpoint', straight_run / 'last.pth', '--data-dir', tiny_data]
    for bad, line in ((['-b', -1], '--batch-size: must be >= 1, got -1'), (['-b', 0], '--batch-size: must be >= 1, '
                      'got 0'), (['-j', -1], '--workers: must be >= 0, got -1'), (['--img-size', 0], '--val-img-size: '
                      'must be >= 1, got 0'), (['--crop-pct', 0], '--crop-pct: must be in (0, 1], got 0.0'),
                      (['--std', 0.2, 0, 0.2], '--std: must be finite and > 0, got [0.2, 0.0, 0.2]')):
        result = run_main('validate.py', *common, *bad)
        assert result.returncode == 2 and one_line_error(result.stderr) == f'error: {line}', bad


def test_ctrl_c_twice_is_one_line_not_a_traceback(tiny_data, tmp_path):
    """The first Ctrl-C asks for a graceful stop (a recovery checkpoint, exit 75); a second one before that is done
    stops at once, as a user who presses it twice means."""
    process = start_training(*BASE, '--data-dir', tiny_data, '--output', tmp_path / 'run', '--epochs', 20)
    read_until(process, r'epoch 0/\d+ step 2/')
    os.killpg(process.pid, signal.SIGINT)
    os.killpg(process.pid, signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    line = one_line_error(rest)
    assert (process.returncode, line) in ((130, 'stopped: interrupted (Ctrl-C); nothing more was saved'),
                                          (75, line)), (process.returncode, rest[-2000:])
    assert line.startswith('stopped: ')
