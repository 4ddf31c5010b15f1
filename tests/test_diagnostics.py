"""Diagnostics against brute-force float64 computations from the thesis's definitions, on a tiny network."""
import csv
import itertools

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pgt.models  # noqa: F401
from conftest import ROOT, run_script
from pgt import power_grad_cross_entropy
from pgt.diagnostics import (Diagnostics, GradientMask, count_zeroed_filters, dead_pooled_features, filter_norms,
                             gradient_coherence, gradient_confusion, gradient_diversity, micro_batch_gradients,
                             per_example_gradients)

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
def diagnostics_runs(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp('diag')
    common = ['--config', ROOT / 'configs' / 'smoke.yaml', '--data-dir', tiny_data, '--epochs', 2,
              '--cooldown-epochs', 0, '--workers', 0]
    run_script('train.py', *common, '--output', runs / 'off', check=True)
    run_script('train.py', *common, '--output', runs / 'on', '--diagnostics', '--diagnostics-interval', 3,
               '--diagnostics-mask', 0.25, check=True)
    return runs


def test_diagnostics_do_not_change_the_training_trajectory(diagnostics_runs):
    on = torch.load(diagnostics_runs / 'on' / 'last.pth', weights_only=True)['model']
    off = torch.load(diagnostics_runs / 'off' / 'last.pth', weights_only=True)['model']
    assert all(torch.equal(on[k], off[k]) for k in off)


def test_tensorboard_and_csv_hold_the_diagnostics(diagnostics_runs):
    events = EventAccumulator(str(diagnostics_runs / 'on' / 'tb'), size_guidance={'histograms': 0, 'scalars': 0})
    events.Reload()
    scalars, histograms = set(events.Tags()['scalars']), set(events.Tags()['histograms'])
    for name in ('loss', 'logit_norm', 'step_consistency', 'gradient_diversity', 'gradient_confusion',
                 'gradient_coherence', 'zeroed_filters', 'dead_pooled_features'):
        assert f'diagnostics/{name}' in scalars, name
    assert 'diagnostics/filter_norms/conv1' in histograms and 'diagnostics/filter_norms/layer4.1.conv2' in histograms
    with open(diagnostics_runs / 'on' / 'diagnostics.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['step']) for r in rows] == [3, 6, 9, 12, 15, 18]  # every 3 of the 2 x 10 steps
    assert all(float(r['gradient_diversity']) > 0 and 0 <= float(r['gradient_confusion']) <= 1 for r in rows)


def test_alpha_sweep_draws_three_figures(paper_pair, tiny_data, tmp_path):
    checkpoints = [paper_pair / name / 'last.pth' for name in ('resnet18-cosine-baseline', 'resnet18-cosine-pgt')]
    result = run_script('scripts/alpha_sweep.py', '--checkpoints', *checkpoints, '--data-dir', tiny_data,
                        '--out', tmp_path, check=True)
    figures = [line for line in result.stdout.splitlines() if line.endswith('.png')]
    assert len(figures) == 3 and all((tmp_path / f.split('/')[-1]).stat().st_size > 1000 for f in figures)
