"""The DALI backend in CPU mode (device_id=None): the same labels, images and sharding as the torch backend."""
import json
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from conftest import SMOKE, TINY, run_main
from pgt.data import build_transform
from pgt.errors import UsageError
from pgt.runlog import read_summary

dali = pytest.importorskip('nvidia.dali', reason='NVIDIA DALI is optional (requirements-dali.txt)')
from pgt.loaders import build_loaders  # noqa: E402


def dali_args(data_dir, **overrides):
    base = dict(data_dir=str(data_dir), data_backend='dali', dali_device='cpu', batch_size=8, workers=2, seed=0,
                img_size=32, val_img_size=32, crop_pct=0.875, interpolation='bilinear', train_interpolation='bilinear',
                scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, color_jitter=0.0, amp=False, amp_dtype='float16',
                channels_last=False, dataset='imagefolder', mean=list(IMAGENET_DEFAULT_MEAN),
                std=list(IMAGENET_DEFAULT_STD))
    return SimpleNamespace(**{**base, **overrides})


def labels_of(loader):
    return [label for _, labels in loader for label in labels.tolist()]


def test_labels_equal_imagefolder(tiny_data):
    from torchvision.datasets import ImageFolder
    loaders = build_loaders(dali_args(tiny_data), 0, 1, torch.device('cpu'))
    assert labels_of(loaders.val) == ImageFolder(str(tiny_data / 'val')).targets  # same files, same order
    assert sorted(labels_of(loaders.train)) == sorted(ImageFolder(str(tiny_data / 'train')).targets)
    assert loaders.num_classes == 10


@pytest.mark.parametrize('channels_last', [False, True])
def test_training_batch_shape_dtype_layout_and_range(tiny_data, channels_last):
    """NCHW whatever --channels-last: the training loop converts after normalising (engine.to_device)."""
    loader = build_loaders(dali_args(tiny_data, channels_last=channels_last), 0, 1, torch.device('cpu')).train
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.is_contiguous()
    assert -3.0 < images.min() and images.max() < 3.0  # normalised: (x/255 - mean) / std lies in about [-2.2, 2.7]


def test_pipelines_hand_uint8_batches_normalised_on_the_device_as_the_float_formula(tiny_data):
    """The DALI pipeline ends in uint8 (its CMN no longer normalises); the device loader's batch is
    (x / 255 - mean) / std of those bytes, computed here in float64."""
    loader = build_loaders(dali_args(tiny_data), 0, 1, torch.device('cpu')).val
    raw, _ = next(iter(loader.loader))  # the DaliLoader inside the device loader
    assert raw.dtype == torch.uint8 and raw.shape == (8, 3, 32, 32) and raw.is_contiguous()
    normalised, _ = next(iter(loader))
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN,
                                                                                  IMAGENET_DEFAULT_STD))
    expected = (raw.double() / 255 - mean) / std
    assert normalised.dtype == torch.float32 and (normalised.double() - expected).abs().max() < 1e-6


def unique_label_order(data, seed, world_size=1):
    labels = []
    for rank in range(world_size):
        loader = build_loaders(dali_args(data, batch_size=4, seed=seed), rank, world_size,
                                    torch.device('cpu')).train
        labels.append(labels_of(loader))
    return labels


def test_the_training_order_depends_on_the_seed(tmp_path):
    """DALI's own reshuffle ignores its seed argument; the suite permutes the file list with --seed first."""
    data = unique_label_tree(tmp_path / 'unique', 24)
    first, again, other = (unique_label_order(data, seed, 2) for seed in (0, 0, 1))
    assert first == again  # same seed, same order on each rank
    assert first != other  # another seed, another order
    for order in (first, other):
        assert sorted(order[0] + order[1]) == list(range(24))  # still every image once over the two shards


def test_validation_pixels_match_the_torchvision_pipeline(tiny_data):
    """Same decode, resize to 256/224 of the size, centre crop and normalisation as timm's eval transform."""
    from torchvision.datasets import ImageFolder
    images, _ = next(iter(build_loaders(dali_args(tiny_data), 0, 1, torch.device('cpu')).val))
    samples = ImageFolder(str(tiny_data / 'val')).samples[:8]
    transform = build_transform(dali_args(tiny_data), training=False)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    reference = torch.stack([(transform(Image.open(path).convert('RGB')) / 255 - mean) / std for path, _ in samples])
    per_channel = (images.mean((0, 2, 3)) - reference.mean((0, 2, 3))).abs()
    assert per_channel.max() < 0.05, per_channel  # decoders and resize kernels differ by rounding only
    assert (images - reference).abs().mean() < 0.1


def unique_label_tree(root, count):
    """One image per class, so that a label names a sample."""
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for i in range(count):
            folder = root / split / f'n{i:08d}'
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / 'a.JPEG')
    return root


@pytest.mark.parametrize('count,batch', [(24, 4), (25, 13)])
def test_two_shards_cover_the_training_set_once_per_epoch(tmp_path, count, batch):
    data = unique_label_tree(tmp_path / 'unique', count)
    seen = []
    for rank in (0, 1):
        loaders = build_loaders(dali_args(data, batch_size=batch), rank, 2, torch.device('cpu'))
        assert len(loaders.train) == -(-count // 2) // batch  # the same number of steps on both ranks
        seen += labels_of(loaders.train)
    padding = (-count) % 2  # the file list is padded by repeating files until it divides by 2
    assert sorted(set(seen)) == list(range(count)) and len(seen) == count + padding
    assert sum(n - 1 for n in Counter(seen).values()) == padding  # each padded file once more, no other repeat


def test_two_shards_evaluate_each_validation_image_once(tmp_path):
    data = unique_label_tree(tmp_path / 'unique', 25)
    seen = []
    for rank in (0, 1):
        seen += labels_of(build_loaders(dali_args(data, batch_size=4), rank, 2, torch.device('cpu')).val)
    assert sorted(seen) == list(range(25))


def test_dali_cpu_training_run_matches_torch_backend(tiny_data, tmp_path):
    # Both backends see the same images with the same augmentation settings but different random draws and JPEG
    # decoders, so their numbers differ a little; on this separable set both end near 100%. A label mix-up or a
    # broken normalisation would end near 10% (chance), far outside the 10-point tolerance.
    common = ['--config', TINY, '--data-dir', tiny_data, '--epochs', 3, '--cooldown-epochs', 1]
    top1 = {}
    for backend in ('torch', 'dali'):
        extra = ['--data-backend', 'dali', '--dali-device', 'cpu'] if backend == 'dali' else []
        run_main('train.py', *common, *extra, '--output', tmp_path / backend, check=True)
        rows = read_summary(tmp_path / backend)
        assert len(rows) == 4
        top1[backend] = float(rows[-1]['eval_top1'])
    assert top1['torch'] >= 60 and abs(top1['dali'] - top1['torch']) <= 10, top1


def test_missing_dali_is_a_one_line_error(tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, 'nvidia.dali', None)  # import nvidia.dali now fails as if not installed
    with pytest.raises(UsageError, match='needs NVIDIA DALI, which is not installed: pip install -r '
                                         'requirements-dali.txt') as error:
        build_loaders(dali_args(tiny_data), 0, 1, torch.device('cpu'))
    assert '\n' not in str(error.value)


def test_gpu_decoding_without_cuda_is_a_one_line_error(tiny_data):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA: the GPU request is valid here')
    with pytest.raises(UsageError, match='--dali-device gpu needs CUDA'):
        build_loaders(dali_args(tiny_data, dali_device='gpu'), 0, 1, torch.device('cpu'))


def test_empty_data_directory_is_a_one_line_error(tmp_path):
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    result = run_main('train.py', '--config', SMOKE, '--data-dir', tmp_path / 'empty', '--data-backend', 'dali',
                      '--dali-device', 'cpu', '--output', tmp_path / 'run')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: ') and 'no class folders' in result.stderr


def test_an_abandoned_epoch_does_not_shift_the_next_one(tiny_data):
    """Taking one batch (the diagnostics probe) and leaving must not make the next full pass start mid-epoch."""
    from torchvision.datasets import ImageFolder
    val = build_loaders(dali_args(tiny_data), 0, 1, torch.device('cpu')).val
    first = next(iter(val))
    assert labels_of(val) == ImageFolder(str(tiny_data / 'val')).targets
    assert torch.equal(next(iter(val))[0], first[0])


@pytest.mark.parametrize('world_size', [1, 2])
def test_epoch_length_agrees_with_the_torch_backend(tiny_data, world_size):
    for batch in (8, 12, 32):
        args = dali_args(tiny_data, batch_size=batch, strict_data=False, workers=0)
        for rank in range(world_size):
            dali = build_loaders(args, rank, world_size, torch.device('cpu'))
            torch_loaders = build_loaders(dali_args(tiny_data, batch_size=batch, strict_data=False, workers=0,
                                                    data_backend='torch'), rank, world_size, torch.device('cpu'))
            assert len(dali.train) == len(torch_loaders.train), (batch, rank)


def test_validate_with_dali_agrees_with_torch(paper_runs, tiny_data):
    # Same checkpoint and images; the decoders and resize kernels differ by rounding, which may flip an image or two.
    checkpoint = paper_runs / 'resnet18-cosine-pgt' / 'seed1' / 'last.pth'
    results = {}
    for backend in ('torch', 'dali'):
        extra = ['--data-backend', 'dali', '--dali-device', 'cpu'] if backend == 'dali' else []
        result = run_main('validate.py', '--checkpoint', checkpoint, '--data-dir', tiny_data, '--json', *extra,
                          check=True)
        results[backend] = json.loads(result.stdout)
    assert results['dali']['images'] == results['torch']['images'] == 80
    assert abs(results['dali']['top1'] - results['torch']['top1']) <= 2.5  # at most 2 of 80 images


def test_val_img_size_changes_only_evaluation(tiny_data):
    loaders = build_loaders(dali_args(tiny_data, val_img_size=48), 0, 1, torch.device('cpu'))
    assert next(iter(loaders.train))[0].shape[-2:] == (32, 32)
    assert next(iter(loaders.val))[0].shape[-2:] == (48, 48)
