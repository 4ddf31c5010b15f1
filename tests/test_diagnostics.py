"""Diagnostics against brute-force float64 computations from the thesis's definitions, on a tiny network."""
import contextlib
import csv
import io
import itertools
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.layers import convert_sync_batchnorm

import pgt.models  # noqa: F401
from conftest import PAPER_PAIR, TINY, script_module, train_in_process
from pgt import PowerGradCrossEntropy, power_grad_cross_entropy
from pgt.diagnostics import (Diagnostics, GradientMask, count_zeroed_filters, dead_pooled_features, filter_norms,
                             gradient_coherence, gradient_confusion, gradient_diversity, micro_batch_gradients,
                             per_example_gradients, series_layers)
from pgt.errors import UsageError

ALPHA = 0.3


def loss_fn(logits, y):
    return power_grad_cross_entropy(logits, y, ALPHA, check_targets=False)


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 5)).double()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 5, (8,), generator=gen)


def brute_gradient(model, x, y, train: bool):
    """One autograd backward per batch, flattened in float64: the definitions' h_W(w, X)."""
    model.train(train)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return np.concatenate([p.grad.detach().reshape(-1).numpy() for p in model.parameters()])


def relative(a, b):
    return abs(a - b) / abs(b)


def reference_metrics(micro, examples):
    """Eq. 3.24-3.26 with explicit sums and a pairwise loop."""
    diversity = sum(g @ g for g in micro) / (sum(micro) @ sum(micro))
    cosines = [a @ b / np.sqrt((a @ a) * (b @ b)) for a, b in itertools.combinations(micro, 2)]
    confusion = -min(min(cosines), 0.0)
    mean = sum(examples) / len(examples)
    coherence = sum(mean @ g for g in examples) / sum(g @ g for g in examples)
    return diversity, confusion, coherence


def test_conditioning_metrics_equal_brute_force(batch):
    x, y = batch
    model = tiny_net()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    micro = [brute_gradient(model, x[i:i + 2], y[i:i + 2], train=True) for i in range(0, 8, 2)]
    model.load_state_dict(buffers)  # the brute-force train-mode passes moved the batch-norm statistics back
    examples = [brute_gradient(model, x[i:i + 1], y[i:i + 1], train=False) for i in range(8)]
    diversity, confusion, coherence = reference_metrics(micro, examples)
    per_example = per_example_gradients(model, loss_fn, x, y)
    grads = micro_batch_gradients(model, loss_fn, x, y, 4)
    assert relative(gradient_diversity(grads), diversity) < 1e-6
    assert relative(gradient_confusion(grads), confusion) < 1e-6 if confusion else gradient_confusion(grads) == 0
    assert relative(gradient_coherence(per_example), coherence) < 1e-6


def test_masked_metrics_equal_brute_force_on_the_masked_coordinates_and_approximate_the_full_ones(batch):
    x, y = batch
    model = tiny_net()
    params = list(model.parameters())
    mask = GradientMask(params, 0.25, seed=3)
    sizes = [p.numel() for p in params]
    assert [len(i) for i in mask.indices] == [int(np.ceil(0.25 * n)) for n in sizes]  # per layer, rounded up
    offsets = np.cumsum([0] + sizes[:-1])
    keep = np.concatenate([o + i.numpy() for o, i in zip(offsets, mask.indices)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    micro = [brute_gradient(model, x[i:i + 2], y[i:i + 2], train=True) for i in range(0, 8, 2)]
    model.load_state_dict(state)
    examples = [brute_gradient(model, x[i:i + 1], y[i:i + 1], train=False) for i in range(8)]
    masked_reference = reference_metrics([g[keep] for g in micro], [g[keep] for g in examples])
    full_reference = reference_metrics(micro, examples)
    coherence = gradient_coherence(per_example_gradients(model, loss_fn, x, y, mask))
    masked = (gradient_diversity(micro_batch_gradients(model, loss_fn, x, y, 4, mask)),
              gradient_confusion(micro_batch_gradients(model, loss_fn, x, y, 4, mask)), coherence)
    for ours, exact in zip(masked, masked_reference):
        assert abs(ours - exact) <= 1e-6 * abs(exact)
    # A 25% mask keeps 1/4 of each layer: inner products of the kept coordinates estimate the full ones with a
    # relative error of order 1/sqrt(kept) (about 0.2 here, 31 coordinates); ratios of them stay within 0.5.
    for ours, full in zip(masked, full_reference):
        assert abs(ours - full) <= 0.5 * max(abs(full), 0.1)


def test_step_consistency_from_two_observed_updates():
    model = nn.Linear(3, 2).double()
    params = list(model.parameters())
    diag = Diagnostics(model, nn.Identity(), (torch.zeros(1), torch.zeros(1)), interval=2, run_dir='.', runlog=None)
    gen = torch.Generator().manual_seed(0)
    g1 = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    g2 = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    w = np.concatenate([p.detach().reshape(-1).numpy() for p in params])
    for grads, lr in ((g1, 0.1), (g2, 0.05)):  # updates 1 and 2; update 2 is the interval step
        for p, g in zip(params, grads):
            p.grad = g
        diag.observe_grads(lr)
    a = np.concatenate([g.reshape(-1).numpy() for g in g1])
    b = np.concatenate([g.reshape(-1).numpy() for g in g2])
    expected = np.linalg.norm(b - a) * np.linalg.norm(w) / (0.1 * (a @ a))  # Def. 2.5, between-steps estimate
    assert relative(diag.kappa, expected) < 1e-6


@pytest.mark.parametrize('name', ['resnet18', 'resnet18_nobn'])
def test_zeroed_filter_counting_finds_exactly_the_zeroed_filters(name):
    model = timm.create_model(name, num_classes=10)
    zeroed = {'layer1.0.conv1': [3, 7], 'layer3.1.conv2': [0], 'conv1': [63]}
    with torch.no_grad():
        for layer, filters in zeroed.items():
            model.get_submodule(layer).weight[filters] = 0
    counts = count_zeroed_filters(filter_norms(model))
    assert {k: v for k, v in counts.items() if v} == {k: len(v) for k, v in zeroed.items()}
    assert len(counts) == 20


def test_dead_pooled_features_are_counted():
    model = timm.create_model('resnet18', num_classes=10).eval()
    with torch.no_grad():  # the last block's output is relu(bn2(...) + shortcut): force channels 0-2 below zero
        bn = model.layer4[-1].bn2
        bn.weight.zero_()
        bn.bias.fill_(100.0)
        bn.bias[:3] = -1e6
    assert dead_pooled_features(model, torch.randn(4, 3, 32, 32)) == 3


@pytest.fixture(scope='module')
def diagnostics_runs(paper_runs, tiny_data, tmp_path_factory):
    """The baseline's seed-0 run (diagnostics on) and the same run without diagnostics."""
    off = tmp_path_factory.mktemp('diag') / 'off'
    train_in_process('--config', TINY, '--data-dir', tiny_data, '--output', off, '--epochs', 2, '--cooldown-epochs', 0,
                     '--pgt-alpha', 1.0, '--pgt-start-epoch', 0, '--seed', 0, '--log-interval', 100)
    return {'on': paper_runs / 'resnet18-cosine-baseline' / 'seed0', 'off': off}


def test_diagnostics_do_not_change_the_training_trajectory(diagnostics_runs):
    on = torch.load(diagnostics_runs['on'] / 'last.pth', weights_only=True)['state_dict']
    off = torch.load(diagnostics_runs['off'] / 'last.pth', weights_only=True)['state_dict']
    assert all(torch.equal(on[k], off[k]) for k in off)


def test_tensorboard_and_csv_hold_the_diagnostics(diagnostics_runs):
    events = EventAccumulator(str(diagnostics_runs['on'] / 'tb'), size_guidance={'histograms': 0, 'scalars': 0})
    events.Reload()
    scalars, histograms = set(events.Tags()['scalars']), set(events.Tags()['histograms'])
    for name in ('loss', 'logit_norm', 'step_consistency', 'gradient_diversity', 'gradient_confusion',
                 'gradient_coherence', 'zeroed_filters', 'dead_pooled_features'):
        assert f'diagnostics/{name}' in scalars, name
    assert 'diagnostics/filter_norms/conv1.0' in histograms and 'diagnostics/filter_norms/layer4.0.conv2' in histograms
    with open(diagnostics_runs['on'] / 'diagnostics.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['step']) for r in rows] == [3, 6, 9, 12, 15, 18]  # every 3 of the 2 x 10 steps
    assert all(float(r['gradient_diversity']) > 0 and 0 <= float(r['gradient_confusion']) <= 1 for r in rows)


def test_alpha_sweep_draws_fig6_from_checkpoints(paper_runs, tiny_data, tmp_path):
    checkpoints = [paper_runs / row / 'seed0' / 'last.pth' for row in PAPER_PAIR]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert script_module('scripts/alpha_sweep.py').main(['--checkpoints', *map(str, checkpoints), '--data-dir',
                                                             str(tiny_data), '--out', str(tmp_path)]) == 0
    result = SimpleNamespace(stdout=stdout.getvalue())
    assert result.stdout.splitlines()[:2] == [str(tmp_path / 'fig6-alpha-sweep.png'),
                                              str(tmp_path / 'fig6-alpha-sweep.pdf')]
    assert all((tmp_path / f'fig6-alpha-sweep.{suffix}').stat().st_size > 1000 for suffix in ('png', 'pdf'))
    assert re.fullmatch(r'loss = \S+ x logit norm \+ \S+ \(R\^2 = 1.000\)', result.stdout.splitlines()[2])  # 2 points
    assert len(list(tmp_path.glob('validate-*.json'))) == 2


# ---- the papers' Fig. 5 series

def test_fig5_series_are_the_filter_norms_of_layers_11_and_19_and_the_pooled_feature_norms(tmp_path):
    """Layers counted as the papers count them: the weight tensors in parameter order, from 0. For the ResNet-18
    without BN, 11 is layer3.0.conv2 (Fig. 5a) and 19 the last convolution, layer4.1.conv2 (Fig. 5b)."""
    model = timm.create_model('resnet18_nobn', num_classes=10).double()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    targets = torch.arange(6) % 10
    runlog = SimpleNamespace(scalar=lambda *a: None, histogram=lambda *a: None)
    diag = Diagnostics(model, PowerGradCrossEntropy(0.3), (images, targets), interval=1, run_dir=tmp_path,
                       runlog=runlog, layers=(11, 19))
    assert diag.layers == {'layer11': 'layer3.0.conv2.weight', 'layer19': 'layer4.1.conv2.weight'}
    diag.updates = 1
    diag.after_step(0, 7, torch.tensor(1.0), torch.randn(6, 10))
    with open(tmp_path / 'filter_norms.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    values = {}
    for row in rows:
        assert (row['epoch'], row['step']) == ('0', '7')
        values.setdefault(row['series'], {})[int(row['index'])] = float(row['norm'])
    for series, module in (('layer11', model.layer3[0].conv2), ('layer19', model.layer4[1].conv2)):
        weight = module.weight.detach().numpy()
        expected = [np.sqrt((weight[f] ** 2).sum()) for f in range(weight.shape[0])]  # ||W[f]||_2, filter by filter
        assert [values[series][i] for i in range(len(expected))] == pytest.approx(expected, rel=1e-9)
    with torch.no_grad():
        maps = model.eval().forward_features(images).numpy()  # [6, 512, h, w]
    pooled = maps.mean(axis=(2, 3))
    expected = np.sqrt((pooled ** 2).sum(axis=0))  # ||h[:, j]||_2 over the probe batch, feature by feature
    assert [values['pooled'][j] for j in range(512)] == pytest.approx(expected.tolist(), rel=1e-9)


def test_a_layer_the_model_lacks_is_refused():
    with pytest.raises(UsageError, match=r'--diagnostics-layers: ResNet has weight layers 0-20, got 11, 21'):
        series_layers(timm.create_model('resnet18_nobn', num_classes=10), (11, 21))


# ---- SyncBatchNorm: probes on rank 0 alone must not enter a collective

def small_resnet():
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=5)


def probe_batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def _sync_bn_worker(rank, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    model = convert_sync_batchnorm(small_resnet())
    images, targets = probe_batch()
    if rank == 0:  # as train.py: only rank 0 builds and runs the diagnostics
        runlog = SimpleNamespace(scalar=lambda *a: None, histogram=lambda *a: None)
        diag = Diagnostics(model, PowerGradCrossEntropy(0.3), (images, targets), 1, Path(result_file).parent, runlog)
        diag.updates = 1
        diag.after_step(0, 1, torch.tensor(1.0), torch.randn(8, 5))
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())  # the model itself untouched
        Path(result_file).write_text('done')
    dist.barrier()  # rank 1 waits here; a probe that entered a SyncBatchNorm collective would never return
    dist.destroy_process_group()
    # Leave at once: gloo's threads were seen to abort the interpreter's teardown under load ("terminate called
    # without an active exception"), after the result above is written.
    os._exit(0)


def test_probes_with_sync_batch_norm_run_on_a_plain_copy(tmp_path):
    """Two gloo ranks, a model converted to SyncBatchNorm: rank 0's train-mode probes would need rank 1 in every
    batch norm (on a CPU torch refuses outright; on GPUs they hang). They run on a plain-BN copy instead, and give
    what the same probes give on the model without SyncBatchNorm."""
    result = tmp_path / 'done.txt'
    torch.multiprocessing.spawn(_sync_bn_worker, args=(str(tmp_path / 'init'), str(result)), nprocs=2)
    assert result.read_text() == 'done'
    with open(tmp_path / 'diagnostics.csv', newline='') as f:
        synced = next(csv.DictReader(f))
    plain_dir = tmp_path / 'plain'
    plain_dir.mkdir()
    runlog = SimpleNamespace(scalar=lambda *a: None, histogram=lambda *a: None)
    diag = Diagnostics(small_resnet(), PowerGradCrossEntropy(0.3), probe_batch(), 1, plain_dir, runlog)
    diag.updates = 1
    diag.after_step(0, 1, torch.tensor(1.0), torch.randn(8, 5))
    with open(plain_dir / 'diagnostics.csv', newline='') as f:
        plain = next(csv.DictReader(f))
    for key in ('gradient_diversity', 'gradient_confusion', 'gradient_coherence', 'dead_pooled_features'):
        assert float(synced[key]) == pytest.approx(float(plain[key]), rel=1e-6), key
