"""Data that changes under a run, as a cluster's storage delivers it: a decompression bomb (a real 20000x20000 PNG),
the data directory renamed mid-run, unreadable images counted once each, a class folder without images, a training
set that grew before a mid-epoch resume, and an image DALI cannot read in the first validation batch."""
import re
import shutil
import struct
import zlib

import pytest

from conftest import (BASE, copy_run, file_digests, one_line_error, read_until, run_main, start_training)
from pgt.runlog import read_summary


def write_png(path, width: int, height: int) -> None:
    """A real grayscale PNG of width x height black pixels: a few hundred KB on disk, width x height bytes decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    compressor, row, rows = zlib.compressobj(9), b'\x00' * (width + 1), []  # filter byte 0, then the pixels
    for _ in range(height):
        rows.append(compressor.compress(row))
    rows.append(compressor.flush())
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
                     + chunk(b'IDAT', b''.join(rows)) + chunk(b'IEND', b''))


def test_a_decompression_bomb_is_an_unreadable_image_named_in_a_warning(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    bomb = data / 'train' / 'n00000002' / 'bomb.png'
    write_png(bomb, 20_000, 20_000)
    assert bomb.stat().st_size < 2**20
    result = run_main('train.py', *BASE, '--data-dir', data, '--output', tmp_path / 'run', check=True)
    warnings = [line for line in result.stderr.splitlines() if f'cannot read image {bomb}: ' in line]
    assert len(warnings) == 2 and all('decompression bomb' in line and line.endswith('; using the next image')
                                      for line in warnings), warnings  # PIL's own refusal, beyond 2 x its limit
    assert [int(row['train_unreadable']) for row in read_summary(tmp_path / 'run')] == [1, 1]
    # The limit is an option: a 20 x 20000 strip has 400,000 pixels.
    strip = data / 'train' / 'n00000004' / 'strip.png'
    write_png(strip, 20, 20_000)
    result = run_main('train.py', *BASE, '--data-dir', data, '--output', tmp_path / 'limited', '--max-image-pixels',
                      100_000, '--epochs', 1, '--cooldown-epochs', 0, '--pgt-start-epoch', 0, check=True)
    assert (f'cannot read image {strip}: 20x20000 pixels, over --max-image-pixels 100000 (a decompression bomb?); '
            f'using the next image') in result.stderr


def test_unreadable_images_are_counted_once_each(tiny_data, tmp_path):
    """Eight truncated files, three of them neighbours in the sample order: each is met as its own sample and as a
    neighbour's replacement, and counted once per epoch."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    files = sorted((data / 'train').glob('*/*.JPEG'))
    for path in [files[i] for i in (3, 4, 5, 40, 90, 150, 230, 300)]:
        path.write_bytes(path.read_bytes()[:120])
    run_main('train.py', *BASE, '--data-dir', data, '--output', tmp_path / 'run', check=True)
    assert [int(row['train_unreadable']) for row in read_summary(tmp_path / 'run')] == [8, 8]


def test_the_data_directory_renamed_mid_run_stops_it_with_one_line(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    process = start_training(*BASE, '--data-dir', data, '--output', tmp_path / 'run', '--workers', 2, '--epochs', 20)
    read_until(process, r'epoch 0/\d+ step 2/')
    data.rename(tmp_path / 'moved')
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 2, rest[-3000:]
    assert one_line_error(rest) .startswith(f'error: {data}/train: the data folder is gone (cannot read image {data}/')
    assert rest.count('WARNING') <= 2  # not a warning per image of the set


def test_a_class_folder_without_images_is_a_warning_and_in_val_with_strict_data_an_error(tiny_data, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    for split in ('train', 'val'):
        (data / split / 'n00000099').mkdir()
    result = run_main('train.py', *BASE, '--data-dir', data, '--output', tmp_path / 'run', '--epochs', 1,
                      '--cooldown-epochs', 0, '--pgt-start-epoch', 0, check=True)
    for split in ('train', 'val'):
        assert f'WARNING {data}/{split}: 1 class folder(s) without images: n00000099' in result.stderr
    for backend in ([], ['--data-backend', 'dali', '--dali-device', 'cpu']):  # each checks the index it is handed
        refused = run_main('train.py', *BASE, '--data-dir', data, '--output', tmp_path / 'strict', '--strict-data',
                           *backend)
        assert refused.returncode == 2 and one_line_error(refused.stderr) == (
            f'error: {data}/val: 1 class folder(s) without images: n00000099 (--strict-data)')


def data_with_one_image_added(tiny_data, tmp_path):
    """A copy of the tiny set with one more training image (321 instead of 320)."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    first = sorted((data / 'train' / 'n00000000').glob('*.JPEG'))[0]
    shutil.copy(first, first.with_name('added.JPEG'))
    return data


def test_a_mid_epoch_resume_on_a_training_set_that_changed_is_refused(straight_run, tiny_data, tmp_path):
    data = data_with_one_image_added(tiny_data, tmp_path)
    run_dir = copy_run(straight_run, tmp_path / 'run')
    (run_dir / 'last.pth').unlink()  # recovery.pth: epoch 1 step 9 of 10
    before = file_digests(run_dir)
    result = run_main('train.py', *BASE, '--data-dir', data, '--output', run_dir, '--resume', 'auto')
    assert result.returncode == 2
    assert one_line_error(result.stderr) == (
        f'error: {run_dir}/recovery.pth was written within epoch 1 on another list of training images (320 images '
        f'then, 321 now); restore the images, or move recovery.pth away to continue from the end of the epoch before')
    assert file_digests(run_dir) == before


def test_at_an_epoch_end_a_changed_training_set_is_a_warning(first_epoch_run, tiny_data, tmp_path):
    data = data_with_one_image_added(tiny_data, tmp_path)
    run_dir = copy_run(first_epoch_run, tmp_path / 'run')
    (run_dir / 'recovery.pth').unlink()  # last.pth: the end of epoch 0
    result = run_main('train.py', *BASE, '--data-dir', data, '--output', run_dir, '--resume', 'auto', check=True)
    assert (f'the training images changed since {run_dir}/last.pth (320 images then, 321 now): the run continues on '
            f'the new list') in result.stderr


dali = pytest.importorskip('nvidia.dali', reason='NVIDIA DALI is optional (requirements-dali.txt)')


def test_dali_names_an_unreadable_image_in_the_first_validation_batch(straight_run, tiny_data, tmp_path):
    """DALI's iterator runs the pipeline for its first batches when it is made: a bad image there stopped it
    before the loop that names files, with DALI's own traceback (or, at times, a segmentation fault inside DALI)."""
    data = tmp_path / 'data'
    shutil.copytree(tiny_data, data)
    first = sorted((data / 'val').glob('*/*.JPEG'))[2]
    first.write_bytes(first.read_bytes()[:150])
    result = run_main('validate.py', '--checkpoint', straight_run / 'last.pth', '--data-dir', data, '--data-backend',
                      'dali', '--dali-device', 'cpu')
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert re.match(rf'error: cannot read image {first}: .*; remove or replace it', line), line
