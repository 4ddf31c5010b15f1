"""Paper recipes: every table row has one, its numbers are the published ones, its schedule is the papers'."""
import csv
import math
from pathlib import Path

import pytest
import timm
import torch

import pgt.models  # noqa: F401  (registers resnet18_nobn)
from conftest import ROOT
from pgt.config import finalize_args, parse_config
from pgt.optim import build_scheduler, total_epochs

PAPER = ROOT / 'configs' / 'paper'
ROW_RECIPES = sorted(p for p in PAPER.glob('*.yaml'))
GRID_RECIPES = sorted((PAPER / 'grid').glob('*.yaml'))
PUBLISHED = list(csv.DictReader(open(PAPER / 'published.csv')))


def load(path: Path):
    return finalize_args(parse_config(['--config', str(path)]), world_size=1)


@pytest.mark.parametrize('path', ROW_RECIPES + GRID_RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_names_a_timm_model(path):
    args = load(path)
    assert timm.is_model(args.model)
    assert args.batch_size * 1 == args.global_batch_size


def test_every_distinct_model_builds():
    for name in sorted({load(p).model for p in ROW_RECIPES}):
        with torch.device('meta'):
            model = timm.create_model(name, num_classes=1000)
        assert model.get_classifier().out_features == 1000, name


def test_every_published_row_has_exactly_one_recipe_with_its_numbers():
    blocks = {}
    for path in ROW_RECIPES:
        paper = load(path).paper
        assert paper is not None, path
        blocks.setdefault((str(paper['table']), str(paper['row'])), []).append((path, paper))
    for row in PUBLISHED:
        found = blocks.get((row['table'], row['row']), [])
        assert len(found) == 1, (row['table'], row['row'], found)
        path, paper = found[0]
        assert float(paper['train_acc']) == float(row['train_acc']) and float(paper['test_acc']) == float(
            row['test_acc']), path
        args = load(path)
        assert (args.pgt_alpha if args.pgt_alpha is not None else 1.0) == float(row['alpha']), path
        assert args.global_batch_size == int(row['global_batch']), path
        assert args.sched == row['scheduler'] and args.smoothing == float(row['label_smoothing']), path
        assert (args.model == 'resnet18_nobn') == (row['batch_norm'] == 'no'), path
        assert (PAPER / f"{paper['baseline']}.yaml").is_file(), paper['baseline']


def expected_lr(epoch, peak, sched, warmup, cosine_epochs):
    """The published per-epoch curve, from the papers' formulas (not from timm)."""
    floor = 4e-4
    if epoch < warmup:
        return floor + epoch * (peak - floor) / warmup
    if sched == 'step':
        return peak * 0.1 ** (epoch // 30)
    if epoch >= cosine_epochs:
        return floor
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * epoch / cosine_epochs))


def lr_curve(args):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler, _ = build_scheduler(optimizer, args, updates_per_epoch=1)
    curve = []
    for epoch in range(total_epochs(args)):
        scheduler.step(epoch)
        curve.append(optimizer.param_groups[0]['lr'])
    return curve


@pytest.mark.parametrize('path', ROW_RECIPES + GRID_RECIPES, ids=lambda p: p.stem)
def test_schedule_matches_the_papers(path):
    args = load(path)
    grid, sixty = path.parent.name == 'grid', '60ep' in path.stem
    epochs = 50 if grid else 60 if sixty else 100
    cosine_epochs = 46 if grid else 54 if sixty else 90
    warmup = 2 if grid else 5
    peak = 0.4 * args.global_batch_size / 1024
    curve = lr_curve(args)
    assert len(curve) == epochs
    for epoch in sorted({0, 1, 4, 5, 29, 30, 31, 59, 60, 61, 89, 90, 99, epochs - 1}):
        if epoch < epochs:
            assert curve[epoch] == pytest.approx(expected_lr(epoch, peak, args.sched, warmup, cosine_epochs),
                                                 abs=1e-6), epoch


def test_named_points_of_the_published_curves():
    cosine, step = lr_curve(load(PAPER / 'resnet50-cosine-baseline.yaml')), lr_curve(load(
        PAPER / 'resnet50-step-baseline.yaml'))
    assert cosine[1] == pytest.approx(0.08032) and cosine[5] == pytest.approx(0.397, abs=5e-4)
    assert cosine[90:] == pytest.approx([4e-4] * 10)
    assert (step[30], step[60], step[90]) == pytest.approx((0.04, 0.004, 4e-4))
