"""The papers' models that timm lacks (pgt.models): the ResNet-18 without batch normalisation of Table 2 and the
CIFAR ResNet-20 of the ICLR grid, built and trained on the CPU."""
import contextlib
import io

import pytest
import timm
import torch

import pgt.models  # noqa: F401  (registers the models)
from conftest import ROOT, SMOKE, run_main, script_module, train_in_process
from pgt.runlog import read_summary


def test_nobn_resnet18_has_no_normalisation_layer():
    model = timm.create_model('resnet18_nobn', num_classes=10)
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    assert not [name for name, m in model.named_modules() if isinstance(m, norm_types)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 20 and all(c.bias is None for c in convs)  # as published: timm's bias-free convolutions
    reference = timm.create_model('resnet18', num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in reference.named_parameters() if 'bn' not in n and 'downsample.1' not in n)


def test_nobn_resnet18_trains_on_the_tiny_set(tiny_data, tmp_path):
    # As the Table 2 row nobn-bs256-agc-pgt trains it: PGT with adaptive gradient clipping (factor 0.01). Without
    # normalisation the residual branches add up at full scale, and plain SGD at this size oscillates.
    train_in_process('--config', SMOKE, '--data-dir', tiny_data, '--output', tmp_path / 'nobn', '--workers', 0,
                     '--model', 'resnet18_nobn', '--lr', 0.02, '--epochs', 3, '--cooldown-epochs', 0,
                     '--warmup-epochs', 0, '--pgt-alpha', 0.25, '--pgt-start-epoch', 0, '--clip-mode', 'agc',
                     '--clip-grad', 0.01)
    losses = [float(r['train_loss']) for r in read_summary(tmp_path / 'nobn')]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0] and losses[-1] < 0.8 * losses[0], losses


def test_resnet20_cifar_is_the_classic_network():
    model = timm.create_model('resnet20_cifar', num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 269_722  # "0.27M" (He et al. 2016, Table 6)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19 and [c.out_channels for c in convs[1::6]] == [16, 32, 64]  # 6n+1 convs, n = 3
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 64, 8, 8) and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.fixture(scope='module')
def tiny_cifar(tmp_path_factory):
    """CIFAR-10's python format, generated: torchvision's CIFAR10 reads it."""
    out = tmp_path_factory.mktemp('cifar') / 'cifar10'
    with contextlib.redirect_stdout(io.StringIO()):
        script_module('scripts/make_tiny_imagenet.py').main(['--synthetic', '--cifar10', '--out', str(out),
                                                             '--train-per-class', '32', '--val-per-class', '8'])
    return out


def test_resnet20_trains_on_a_cifar10_folder(tiny_cifar, tmp_path):
    recipe = ROOT / 'configs' / 'paper' / 'grid' / 'cifar' / 'resnet20.yaml'
    train_in_process('--config', recipe, '--data-dir', tiny_cifar, '--output', tmp_path / 'run', '--epochs', 4,
                     '--cooldown-epochs', 0, '--warmup-epochs', 0, '--global-batch-size', 32, '--lr', 0.05,
                     '--pgt-alpha', 0.3, '--amp-dtype', 'bfloat16', '--workers', 0)
    rows = read_summary(tmp_path / 'run')
    assert len(rows) == 4 and int(rows[0]['eval_images']) == 80  # CIFAR's test set: 10 classes x 8 here
    losses = [float(r['train_loss']) for r in rows]
    # 10 classes of distinct hues: a network that learns ends well above chance (10%); 80 guesses at chance reach
    # 40% with probability below 1e-7.
    assert losses[-1] < losses[0] and float(rows[-1]['eval_top1']) >= 40.0, rows[-1]


def test_a_missing_cifar_folder_is_one_line_naming_the_download_option(tmp_path):
    recipe = ROOT / 'configs' / 'paper' / 'grid' / 'cifar' / 'resnet20.yaml'
    result = run_main('train.py', '--config', recipe, '--data-dir', tmp_path, '--output', tmp_path / 'run')
    assert result.returncode == 2 and not (tmp_path / 'run').exists()
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: no CIFAR-10 in torchvision's format (cifar-10-batches-py/ with data_batch_1-5 and "
        f"test_batch); pass --dataset-download to fetch it")
