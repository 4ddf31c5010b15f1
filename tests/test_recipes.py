"""Paper recipes: every table row has one, its numbers are the published ones, its schedule is the papers'."""
import csv
import math
from pathlib import Path

import pytest
import timm
import torch

import pgt.models  # noqa: F401  (registers resnet18_nobn)
from conftest import ROOT, TINY, lr_curve, run_main
from references import fork_epoch_rates, fork_rate
from pgt.config import finalize_args, parse_config
from pgt.errors import UsageError
from pgt.optim import build_scheduler, set_epoch_rate, set_update_rate, total_epochs
from pgt.runlog import read_summary

PAPER = ROOT / 'configs' / 'paper'
ROW_RECIPES = sorted(p for p in PAPER.glob('*.yaml'))
GRID_RECIPES = sorted(p for p in (PAPER / 'grid').rglob('*.yaml') if p.parent.name != 'cifar')
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


@pytest.mark.parametrize('path', ROW_RECIPES + GRID_RECIPES, ids=lambda p: p.stem)
def test_schedule_matches_the_papers(path):
    args = load(path)
    grid, sixty = 'grid' in path.parts, '60ep' in path.stem
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


# ---- the published runs' own settings, with the evidence

# The evaluation interpolation each model had in the published runs: the default_cfgs of the 2021 timm fork that
# the published code vendors (skalien/power-grad-transform, timm/models/resnet.py): _cfg() is bilinear with crop
# 0.875; resnet50, resnet101, seresnet18 and seresnet50 set interpolation='bicubic'; resnet18 and resnet18_wobn keep
# the default. The published train.py evaluates with resolve_data_config(vars(args), model=model), and trains on its
# DALI pipeline (INTERP_LINEAR) with --dali, as its README's command runs.
PUBLISHED_EVAL_INTERPOLATION = {'resnet18': 'bilinear', 'resnet18_nobn': 'bilinear', 'resnet50': 'bicubic',
                                'resnet101': 'bicubic', 'seresnet18': 'bicubic', 'seresnet50': 'bicubic'}


@pytest.mark.parametrize('path', ROW_RECIPES + GRID_RECIPES, ids=lambda p: p.stem)
def test_data_pipeline_is_the_published_runs(path):
    args = load(path)
    assert args.interpolation == PUBLISHED_EVAL_INTERPOLATION[args.model]
    assert (args.crop_pct, args.img_size, args.val_img_size) == (0.875, 224, 224)
    assert (args.train_interpolation, args.color_jitter, args.scale, args.hflip) == ('bilinear', 0.0, [0.08, 1.0],
                                                                                      0.5)


_built = {}


def built(args):
    key = (args.model, tuple(sorted(args.model_kwargs.items())))
    if key not in _built:
        torch.manual_seed(0)
        _built[key] = timm.create_model(args.model, num_classes=1000, **args.model_kwargs)
    return _built[key]


@pytest.mark.parametrize('path', ROW_RECIPES + GRID_RECIPES, ids=lambda p: p.stem)
def test_the_last_batch_norm_of_each_block_starts_at_one_as_in_the_published_runs(path):
    """The fork's ResNet.init_weights guards its zero-init of each block's last batch norm with
    `isinstance(self.norm_layer, nn.BatchNorm2d)`, where norm_layer is the class, so it never ran: every batch-norm
    weight started at 1. timm 1.x would zero them (zero_init_last=True)."""
    model = built(load(path))
    last_norms = [block.bn3 if hasattr(block, 'bn3') else block.bn2 for stage in
                  (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
    weights = [norm.weight for norm in last_norms if getattr(norm, 'weight', None) is not None]
    assert all(torch.equal(w, torch.ones_like(w)) for w in weights)
    if load(path).model != 'resnet18_nobn':
        assert len(weights) == len(last_norms) > 0  # real batch norms were checked
    assert timm.create_model('resnet18', num_classes=10).layer1[0].bn2.weight.abs().max() == 0  # timm's default


def test_grid_searches_hold_exactly_the_published_alphas():
    """ICLR Sec. 3.1: ResNet-18 from 0.1 to 0.9 by 0.1, then 0.2 to 0.4 by 0.05; ResNet-50 0.2 to 0.4 by 0.05; each
    with alpha 1 (no transform) as the reference point of Fig. 2."""
    from pgt.paper import paper_runs
    alphas = {}
    for run in paper_runs('grid'):
        args = run.args()
        if args.clip_grad is None:
            alphas.setdefault(args.model, []).append(args.pgt_alpha)
            assert args.pgt_start_epoch == (1 if args.model == 'resnet50' else 0), run.name
    assert sorted(alphas['resnet18']) == [0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert sorted(alphas['resnet50']) == [0.2, 0.25, 0.3, 0.35, 0.4, 1.0]
    extended = sorted(run.args().pgt_alpha for run in paper_runs('extended'))
    assert extended == [0.1, 0.5, 0.6, 0.7, 0.8, 0.9] and not set(extended) & set(alphas['resnet50']) - {0.1}


def test_clipping_grids_search_the_assumed_factors_of_table_2():
    from pgt.paper import paper_runs
    grids = {}
    for run in paper_runs('grid'):
        args = run.args()
        if args.clip_grad is not None:
            grids.setdefault(args.clip_mode, set()).add((args.clip_grad, args.pgt_alpha))
            assert (args.model, args.global_batch_size, args.lr) == ('resnet18_nobn', 256, 0.1)
    assert grids['agc'] == {(c, a) for c in (0.005, 0.01, 0.02, 0.04) for a in (1.0, 0.25)}
    assert grids['norm'] == {(c, a) for c in (0.25, 0.5, 1.0, 2.0) for a in (1.0, 0.25)}
    assert load(PAPER / 'nobn-bs256-agc.yaml').clip_grad in {c for c, _ in grids['agc']}  # the assumption is in it


def warmup_prefix_lr(epoch, peak, warmup, epochs, floor=4e-4):
    """The papers' literal reading: linear warmup to the peak, then cosine from the peak at the end of the warmup
    to the floor at epoch ``epochs``, then the floor (cooldown)."""
    if epoch < warmup:
        return floor + epoch * (peak - floor) / warmup
    if epoch >= epochs:
        return floor
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


@pytest.mark.parametrize('extra', [[], ['--sched', 'step', '--decay-epochs', '30'], ['--sched-on-updates']],
                         ids=['cosine', 'step', 'per-update'])
def test_warmup_prefix_means_what_it_means_in_timm(extra):
    """timm's create_scheduler_v2 with the same settings, stepped as timm's train.py steps it, gives every rate and
    the run's length: the warmup comes before --epochs of schedule, so the run is longer by the warmup."""
    from timm.scheduler import create_scheduler_v2
    args = finalize_args(parse_config(['--config', str(PAPER / 'resnet18-cosine-pgt.yaml'), '--warmup-prefix',
                                       *extra]), world_size=1)
    updates = 7 if args.sched_on_updates else 1
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    timm_scheduler, timm_epochs = create_scheduler_v2(
        reference, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=True,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler, epochs = build_scheduler(optimizer, args, updates_per_epoch=updates)
    assert epochs == timm_epochs == (args.epochs + 5 + (10 if args.sched == 'cosine' else 0))
    for epoch in range(epochs):
        for update in range(updates):
            if update == 0:
                timm_scheduler.step(epoch)
                set_epoch_rate(scheduler, epoch, args)
            assert optimizer.param_groups[0]['lr'] == reference.param_groups[0]['lr'], (epoch, update)
            timm_scheduler.step_update(epoch * updates + update + 1)
            set_update_rate(scheduler, epoch * updates + update + 1, args)


def test_the_papers_literal_cosine_is_warmup_prefix_with_the_warmup_taken_from_epochs():
    path = PAPER / 'resnet18-cosine-pgt.yaml'
    literal = finalize_args(parse_config(['--config', str(path), '--warmup-prefix', '--epochs', '85']), 1)
    curve, plain = lr_curve(literal), lr_curve(load(path))
    assert len(curve) == len(plain) == 100
    assert curve[5] == pytest.approx(0.4, abs=1e-6) and plain[5] == pytest.approx(0.397, abs=5e-4)
    for epoch in range(100):
        assert curve[epoch] == pytest.approx(warmup_prefix_lr(epoch, 0.4, 5, 90), abs=1e-6), epoch


# ---- the published code's schedule (--schedule-origin fork)

@pytest.mark.parametrize('row', ['resnet50-cosine-baseline', 'resnet50-step-pgt', 'resnet50-cosine-pgt-60ep'])
def test_schedule_origin_fork_trains_every_epoch_at_the_published_codes_rate(row):
    args = finalize_args(parse_config(['--config', str(PAPER / f'{row}.yaml'), '--schedule-origin', 'fork']), 1)
    curve, expected = lr_curve(args), fork_epoch_rates(args)
    assert len(curve) == len(expected)
    for epoch, (rate, published) in enumerate(zip(curve, expected)):
        assert rate == pytest.approx(published, rel=1e-12, abs=1e-15), epoch
    if args.sched == 'cosine' and args.epochs == 90:
        assert curve[:5] == pytest.approx([4e-4, 0.16032, 0.24024, 0.32016, 0.397], abs=5e-4)  # the figures
    if args.sched == 'step':
        assert [epoch for epoch in range(1, 100) if curve[epoch] < curve[epoch - 1] * 0.5] == [29, 59, 89]
        assert lr_curve(load(PAPER / f'{row}.yaml'))[29:31] == pytest.approx([0.4, 0.04])  # timm's: at 30


def test_a_run_with_schedule_origin_fork_trains_each_epoch_at_the_published_codes_rate(tiny_data, tmp_path):
    run_dir = tmp_path / 'run'
    options = ['--config', TINY, '--epochs', 3, '--cooldown-epochs', 1, '--warmup-epochs', 2, '--warmup-lr', 0.01,
               '--lr', 0.2, '--min-lr', 0.001, '--schedule-origin', 'fork']
    run_main('train.py', *options, '--data-dir', tiny_data, '--output', run_dir, check=True)
    args = finalize_args(parse_config([str(option) for option in options]), world_size=1)
    expected = fork_epoch_rates(args)
    assert [float(row['lr']) for row in read_summary(run_dir)] == pytest.approx(expected, rel=1e-6)
    assert expected[1:] == pytest.approx([fork_rate(2, args), fork_rate(3, args), args.min_lr])  # lr(1) trains no epoch


def test_schedule_origin_fork_is_refused_with_a_schedule_stepped_every_update():
    with pytest.raises(UsageError, match='fork steps the schedule once per epoch'):
        finalize_args(parse_config(['--config', str(PAPER / 'resnet18-cosine-pgt.yaml'), '--schedule-origin', 'fork',
                                    '--sched-on-updates']), 1)


# ---- the budget tier

BUDGET = ROOT / 'configs' / 'budget'
BUDGET_RECIPES = sorted(BUDGET.glob('*.yaml'))


def test_the_budget_tier_covers_table_1_and_table_3():
    rows = {p.stem for p in ROW_RECIPES if str(load(p).paper['table']) in ('1', '3')}
    assert {p.stem for p in BUDGET_RECIPES} == rows and len(rows) == 22


@pytest.mark.parametrize('path', BUDGET_RECIPES, ids=lambda p: p.stem)
def test_budget_recipe_keeps_its_rows_settings_and_scales_its_schedule(path):
    budget, row = load(path), load(PAPER / f'{path.stem}.yaml')
    assert budget.paper['shrinks'] == path.stem and budget.paper['tier'] == 'budget'
    for key in ('model', 'pgt_alpha', 'global_batch_size', 'opt', 'lr', 'momentum', 'weight_decay', 'smoothing',
                'sched', 'model_kwargs', 'interpolation'):
        assert getattr(budget, key) == getattr(row, key), key
    assert budget.pgt_start_epoch == (budget.warmup_epochs if budget.pgt_alpha is not None else 0)  # after warmup
    epochs, row_epochs = total_epochs(budget), total_epochs(row)
    assert epochs <= row_epochs / 5 and (budget.img_size, budget.val_img_size) == (160, 224)
    ratio = epochs / row_epochs  # 1/5: the row's milestones and cosine end scaled by it
    updates = 1_281_167 // budget.global_batch_size
    rates = update_rates(budget, updates, epochs)
    peak = 0.4 * row.global_batch_size / 1024
    for update, rate in enumerate(rates):
        assert rate == pytest.approx(budget_lr(update / updates, ratio, row.sched, peak), abs=1e-9), update
    assert max(later / earlier for earlier, later in zip(rates[1:], rates[2:])) <= 2  # no jump after the first step
    assert f'base: ../paper/{path.stem}.yaml' in path.read_text() and 'training images' in path.read_text()


def update_rates(args, updates_per_epoch: int, epochs: int) -> list[float]:
    """The rate of every update of the run, set as train.py sets it: set_epoch_rate before each epoch,
    set_update_rate after each update."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler, _ = build_scheduler(optimizer, args, updates_per_epoch=updates_per_epoch)
    rates = []
    for epoch in range(epochs):
        set_epoch_rate(scheduler, epoch, args)
        for step in range(1, updates_per_epoch + 1):
            rates.append(optimizer.param_groups[0]['lr'])
            set_update_rate(scheduler, epoch * updates_per_epoch + step, args)
    return rates


def budget_lr(epoch: float, ratio, sched, peak, floor=4e-4, warmup=2):
    """At a fraction of an epoch: FFCV's warmup (linear from the floor to the peak over 2 epochs), then the row's
    curve with its epochs scaled by ``ratio`` (milestones 30/60/90 and cosine end 90 become 30r/60r/90r and 90r)."""
    if epoch < warmup:
        return floor + epoch * (peak - floor) / warmup
    if sched == 'step':
        return peak * 0.1 ** (epoch // (30 * ratio))
    cosine_end = 90 * ratio
    if epoch >= cosine_end:
        return floor
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * epoch / cosine_end))


# ---- CIFAR-10

def test_the_cifar_grid_resolves():
    from pgt.paper import paper_runs
    runs = paper_runs('cifar')
    assert [run.args().pgt_alpha for run in runs] == [0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    args = runs[0].args()
    assert (args.dataset, args.model, args.img_size, total_epochs(args)) == ('cifar10', 'resnet20_cifar', 32, 360)

