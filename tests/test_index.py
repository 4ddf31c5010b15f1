"""The index of a split (pgt.folders.ImageIndex): torchvision ImageFolder's samples in its order, read again by a
restart while the folders it was scanned from are unchanged, scanned again when a class folder gains, loses or
renames a file, and saved by a run for its restarts."""
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from conftest import BASE, age_folders, copy_run, run_main
from pgt.folders import ImageIndex, scan_image_folder
from pgt.loaders import split_indexes


def imagefolder_view(index: ImageIndex):
    """What torchvision's ImageFolder holds, rebuilt from an index."""
    return index.classes, index.samples(), index.labels.tolist()


def assert_as_imagefolder(index: ImageIndex, split_dir) -> None:
    reference = ImageFolder(str(split_dir))
    assert imagefolder_view(index) == (reference.classes, reference.samples, reference.targets)


@pytest.fixture
def data(tiny_data, tmp_path):
    """A copy of the tiny set to change (copytree keeps the folders' old mtimes)."""
    copy = tmp_path / 'data'
    shutil.copytree(tiny_data, copy, symlinks=True)
    return copy


def test_the_scan_lists_imagefolders_samples_in_its_order_on_a_tree_with_links(data, tmp_path):
    """Links that stay inside their class or lead out of the split (a shared store, as dataset managers make them)
    are followed, as ImageFolder follows them: a class folder that is a link, a linked subfolder, a linked file, a
    real subfolder, and a file name with a space and non-ASCII letters."""
    train, store = data / 'train', tmp_path / 'store'
    store.mkdir()
    classes = sorted(train.iterdir())
    images = sorted(classes[0].glob('*.JPEG'))
    shutil.move(classes[3], store / 'moved_class')
    classes[3].symlink_to(store / 'moved_class', target_is_directory=True)
    shutil.copytree(classes[1], store / 'extra')
    (classes[1] / 'linked_sub').symlink_to(store / 'extra', target_is_directory=True)
    shutil.copy(images[0], store / 'shared.JPEG')
    (classes[2] / 'shared.JPEG').symlink_to(store / 'shared.JPEG')
    (classes[0] / 'sub folder').mkdir()
    shutil.copy(images[1], classes[0] / 'sub folder' / 'épreuve 1.jpeg')
    shutil.copy(images[2], classes[0] / 'notes.txt')  # not an image name: neither lists it
    index = scan_image_folder(train)
    assert_as_imagefolder(index, train)
    assert len(index) == 320 + 32 + 1 + 1
    assert_as_imagefolder(scan_image_folder(data / 'val'), data / 'val')


def test_a_saved_index_is_read_while_its_folders_are_unchanged(data, tmp_path):
    """The proof that the saved index is read and no scan made: a file added with its folder's mtime put back (which
    no real change does) is not in the list a restart gets."""
    args, index_dir = SimpleNamespace(data_dir=str(data)), tmp_path / 'index'
    (index, new), = split_indexes(args, ('train',), True, index_dir).values()
    assert new
    index_dir.mkdir()
    (index_dir / 'train.npz').write_bytes(index.save())
    folder = sorted((data / 'train').iterdir())[5]
    before = folder.stat()
    shutil.copy(next(folder.glob('*.JPEG')), folder / 'unseen.JPEG')
    os.utime(folder, ns=(before.st_atime_ns, before.st_mtime_ns))
    (read, new), = split_indexes(args, ('train',), True, index_dir).values()
    assert not new and len(read) == 320 and read.digest() == index.digest()
    assert imagefolder_view(read) == imagefolder_view(index)


def gain_a_file(folder):
    shutil.copy(next(folder.glob('*.JPEG')), folder / 'gained.JPEG')


def lose_a_file(folder):
    next(folder.glob('*.JPEG')).unlink()


def rename_a_file(folder):
    first = next(folder.glob('*.JPEG'))
    first.rename(first.with_name('renamed.JPEG'))


def gain_a_file_in_a_subfolder(folder):
    shutil.copy(next(folder.glob('*.JPEG')), folder / 'sub' / 'gained.JPEG')


def add_a_class(folder):
    shutil.copytree(folder, folder.with_name('n00000999'))


def rename_a_class(folder):
    folder.rename(folder.with_name('n00000999'))


@pytest.mark.parametrize('change', [gain_a_file, lose_a_file, rename_a_file, gain_a_file_in_a_subfolder, add_a_class,
                                    rename_a_class])
def test_a_changed_tree_is_scanned_again(change, data, tmp_path):
    args, index_dir = SimpleNamespace(data_dir=str(data)), tmp_path / 'index'
    folder = sorted((data / 'train').iterdir())[5]
    (folder / 'sub').mkdir()  # an empty subfolder, there before the index was made
    age_folders(folder)
    (index, _), = split_indexes(args, ('train',), True, index_dir).values()
    index_dir.mkdir()
    (index_dir / 'train.npz').write_bytes(index.save())
    change(folder)
    (rescanned, new), = split_indexes(args, ('train',), True, index_dir).values()
    assert new and rescanned.digest() != index.digest()
    assert_as_imagefolder(rescanned, data / 'train')


def test_an_index_is_not_read_for_another_folder_a_fresh_change_or_when_damaged(data, tmp_path, caplog):
    args, index_dir = SimpleNamespace(data_dir=str(data)), tmp_path / 'index'
    index_dir.mkdir()
    (index_dir / 'train.npz').write_bytes(scan_image_folder(data / 'train').save())
    moved = tmp_path / 'moved'
    data.rename(moved)  # the same folders under another path: the index names the one it was made from
    (_, new), = split_indexes(SimpleNamespace(data_dir=str(moved)), ('train',), True, index_dir).values()
    assert new
    moved.rename(data)
    # A folder changed within the mtime's resolution before the scan may change again unseen: scanned again.
    os.utime(sorted((data / 'train').iterdir())[0])
    (index_dir / 'train.npz').write_bytes(scan_image_folder(data / 'train').save())
    (_, new), = split_indexes(args, ('train',), True, index_dir).values()
    assert new
    (index_dir / 'train.npz').write_bytes(b'PK\x03\x04 cut short')
    (index, new), = split_indexes(args, ('train',), True, index_dir).values()
    assert new and f'{index_dir}/train.npz cannot be read' in caplog.text
    assert_as_imagefolder(index, data / 'train')


def test_a_run_saves_its_indexes_and_its_restart_reads_them(first_epoch_run, tiny_data, tmp_path):
    """The index files are plain numpy archives (no pickled objects), of the data the run read; the restart of a
    copy of the run lists the data from them."""
    for split in ('train', 'val'):
        with np.load(first_epoch_run / 'index' / f'{split}.npz', allow_pickle=False) as saved:
            assert str(saved['root']) == str(tiny_data / split)
        assert_as_imagefolder(ImageIndex.load(first_epoch_run / 'index' / f'{split}.npz'), tiny_data / split)
    run_dir = copy_run(first_epoch_run, tmp_path / 'run')
    result = run_main('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, '--resume', 'auto', check=True)
    for split in ('train', 'val'):
        assert f'{tiny_data / split}: {320 if split == "train" else 80} images listed by {run_dir}/index/' \
               f'{split}.npz' in result.stderr
    assert 'scanning' not in result.stderr
