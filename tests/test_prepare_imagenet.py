"""scripts/prepare_imagenet.py on a generated raw ILSVRC2012 layout: the devkit's ground truth (meta.mat and the
ground-truth text, in its tar.gz), Kaggle's CSV, a missing and an unreadable image."""
import io
import shutil
import tarfile

import numpy as np
from PIL import Image
from scipy.io import savemat

from conftest import run_main

WNIDS = ['n01440764', 'n01443537', 'n01484850']
LABELS = [2, 1, 3, 3, 1, 2, 2]  # ILSVRC2012_IDs of images 1-7 (image 7 is listed, but its file is missing)


def jpeg(path, value):
    Image.fromarray(np.full((20, 30, 3), value, dtype=np.uint8)).save(path, quality=90)


def raw_tree(root):
    """train/<wnid>/ with two images each, and the 50,000-in-one-folder val/ of the official download (six here)."""
    for wnid in WNIDS:
        (root / 'train' / wnid).mkdir(parents=True)
        for i in range(2):
            jpeg(root / 'train' / wnid / f'{wnid}_{i}.JPEG', 40 * i)
    (root / 'val').mkdir()
    for number in range(1, 7):
        jpeg(root / 'val' / f'ILSVRC2012_val_{number:08d}.JPEG', 30 * number)
    broken = root / 'val' / 'ILSVRC2012_val_00000004.JPEG'
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated download
    return root


def devkit(path):
    """ILSVRC2012_devkit_t12.tar.gz's two files: meta.mat's synsets (the three leaves, ILSVRC2012_IDs 1-3, mapped to
    WNIDS in another order, and one inner node) and the ground truth, an ID per line."""
    fields = [('ILSVRC2012_ID', 'O'), ('WNID', 'O'), ('words', 'O'), ('num_children', 'O')]
    synsets = np.zeros((4, 1), dtype=fields)
    for row, (class_id, wnid, children) in enumerate([(1, WNIDS[1], 0), (2, WNIDS[0], 0), (3, WNIDS[2], 0),
                                                      (1001, 'n00001740', 3)]):
        synsets[row, 0] = (np.array([[class_id]]), np.array([wnid]), np.array(['words']), np.array([[children]]))
    meta = io.BytesIO()
    savemat(meta, {'synsets': synsets})
    truth = ''.join(f'{label}\n' for label in LABELS).encode()
    with tarfile.open(path, 'w:gz') as archive:
        for name, data in (('meta.mat', meta.getvalue()), ('ILSVRC2012_validation_ground_truth.txt', truth)):
            info = tarfile.TarInfo(f'ILSVRC2012_devkit_t12/data/{name}')
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


EXPECTED = {1: WNIDS[0], 2: WNIDS[1], 3: WNIDS[2], 4: WNIDS[2], 5: WNIDS[1], 6: WNIDS[0]}  # via meta.mat's IDs


def sorted_files(val):
    return {int(p.stem[-8:]): p.parent.name for p in val.glob('*/ILSVRC2012_val_*.JPEG')}


def test_devkit_ground_truth_sorts_val_and_reports_the_missing_and_unreadable(tmp_path):
    data = raw_tree(tmp_path / 'imagenet')
    result = run_main('scripts/prepare_imagenet.py', '--data-dir', data, '--devkit', devkit(tmp_path / 'dk.tar.gz'))
    assert result.returncode == 1, result.stderr  # problems found
    assert sorted_files(data / 'val') == EXPECTED and not list((data / 'val').glob('*.JPEG'))
    out = result.stdout
    assert 'moved 6 validation images into class folders (0 were already sorted)' in out
    assert f'missing: {data}/val/ILSVRC2012_val_00000007.JPEG is in the labels but not in val/' in out
    assert 'unreadable: ' in out and 'ILSVRC2012_val_00000004.JPEG' in out
    assert 'train: 3 classes, 6 images; val: 3 classes, 6 images' in out
    assert 'classes: 3, ImageNet-1k has 1,000' in out and 'val: 6, ImageNet-1k has 50,000' in out
    again = run_main('scripts/prepare_imagenet.py', '--data-dir', data, '--devkit', tmp_path / 'dk.tar.gz')
    assert 'moved 0 validation images into class folders (6 were already sorted)' in again.stdout
    assert sorted_files(data / 'val') == EXPECTED


def test_a_dry_run_moves_nothing_and_checks_as_the_sort_would(tmp_path):
    data = raw_tree(tmp_path / 'imagenet')
    before = sorted(p.relative_to(data) for p in data.rglob('*'))
    result = run_main('scripts/prepare_imagenet.py', '--data-dir', data, '--devkit', devkit(tmp_path / 'dk.tar.gz'),
                      '--dry-run')
    assert sorted(p.relative_to(data) for p in data.rglob('*')) == before
    assert result.returncode == 1 and 'ok: ImageNet-1k' not in result.stdout
    out = result.stdout
    assert 'would move 6 validation images into class folders (0 were already sorted)' in out
    assert 'train: 3 classes, 6 images; val: 3 classes, 6 images' in out  # val/ as the sort would leave it
    assert 'classes: 3, ImageNet-1k has 1,000' in out and 'ILSVRC2012_val_00000004.JPEG' in out  # unreadable


def test_kaggle_csv_sorts_val_the_same_way(tmp_path):
    data = raw_tree(tmp_path / 'imagenet')
    (data / 'val' / 'ILSVRC2012_val_00000004.JPEG').unlink()
    shutil.copy(data / 'val' / 'ILSVRC2012_val_00000003.JPEG', data / 'val' / 'ILSVRC2012_val_00000004.JPEG')
    csv = tmp_path / 'LOC_val_solution.csv'
    csv.write_text('ImageId,PredictionString\n' + ''.join(
        f'ILSVRC2012_val_{n:08d},{wnid} 10 20 30 40 {wnid} 1 2 3 4\n' for n, wnid in EXPECTED.items()))
    result = run_main('scripts/prepare_imagenet.py', '--data-dir', data, '--kaggle-csv', csv)
    assert sorted_files(data / 'val') == EXPECTED
    assert 'moved 6 validation images' in result.stdout and 'unreadable' not in result.stdout


def test_the_no_class_folders_error_names_the_script(tmp_path, tiny_data):
    data = raw_tree(tmp_path / 'imagenet')
    result = run_main('train.py', '--config', 'configs/smoke.yaml', '--data-dir', data, '--output', tmp_path / 'r')
    assert result.returncode == 2
    assert 'no class folders' in result.stderr and 'scripts/prepare_imagenet.py sorts it' in result.stderr
