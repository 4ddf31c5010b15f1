"""--train-img-sizes, timm's scheduled training resolutions: each batch's size drawn as timm's own scheduled loader
draws it, the progressive schedule stepping through the sizes as FFCV's progressive resizing does, every crop made at
its batch's size, a resumed epoch continuing with the same batches, and a run logging what each epoch trains at."""
import re

import pytest
import torch
from timm.data import create_loader, create_transform

from conftest import BASE, ROOT, SMOKE, loader_args, one_line_error, run_main, train_in_process
from pgt.config import finalize_args, parse_config
from pgt.data import SeededSamples, ShardedSampler, TrainSizes, build_dataset
from pgt.loaders import build_loaders
from pgt.reproduce import variant_options

CPU = torch.device('cpu')


def sizes_args(data_dir, sizes, schedule, epochs=4, spread=0.65, mix=0.1, **overrides):
    return loader_args(data_dir, train_img_sizes=sizes, train_size_probs=None, train_size_schedule=schedule,
                       train_size_schedule_spread=spread, train_size_random_mix=mix, epochs=epochs, **overrides)


@pytest.mark.parametrize('schedule', ['constant', 'progressive'])
def test_each_batch_gets_the_size_timms_own_scheduled_loader_gives_it(tiny_data, schedule):
    """The reference is timm's create_loader with input_size_choices (what timm's train.py builds for
    --train-img-sizes) over the same 320 images at batch 8: its batch sampler's choice, batch by batch, every epoch."""
    args = sizes_args(tiny_data, [24, 32, 40], schedule, epochs=4)
    ours = TrainSizes(args, 320 // 8)
    timm_loader = create_loader(build_dataset(args, 'train'), input_size=(3, 32, 32), batch_size=8, is_training=True,
                                input_size_choices=[24, 32, 40], batch_choice_seed=3, batch_choice_schedule=schedule,
                                batch_schedule_epochs=4 if schedule == 'progressive' else None, num_workers=0,
                                use_prefetcher=False, device=CPU)
    for epoch in range(5):
        timm_loader.batch_sampler.set_epoch(epoch)
        expected = [batch[0][1] for batch in timm_loader.batch_sampler]
        assert ours(epoch) == expected
    assert len(set(ours(0))) > 1  # the draw is not one size throughout


def ffcv_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's progressive resizing (ffcv-imagenet train_imagenet.py, get_resolution): min_res up to start_ramp,
    max_res from end_ramp, between them the linear ramp rounded to a multiple of 32."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    ramp = min_res + (max_res - min_res) * (epoch - start_ramp) / (end_ramp - start_ramp)
    return int(round(ramp / 32)) * 32


def test_the_ffcv_resolution_variant_steps_through_the_sizes_as_ffcv_does():
    """Spread 0 and no random mix: one size per epoch, the one nearest the centre e / (epochs - 1) x (n - 1), the
    cooldown epochs at the last. The ffcv-resolution variant on a budget recipe (18 + 2 epochs) trains its last
    quarter at 192 px, as FFCV's rn50_16_epochs.yaml (160 to 192, ramp 11-13 of 16) does, and evaluates at 256."""
    recipe = ROOT / 'configs/budget/resnet50-cosine-pgt.yaml'
    options = variant_options(ROOT / 'configs/variants/ffcv-resolution.yaml')
    args = finalize_args(parse_config(['--config', str(recipe), *options]), world_size=4)
    assert (args.epochs, args.cooldown_epochs, args.val_img_size, args.crop_pct) == (18, 2, 256, 0.875)
    sizes = TrainSizes(args, 40)
    ours = []
    for epoch in range(20):
        [size] = {args.train_img_sizes[choice] for choice in sizes(epoch)}
        ours.append(size)
    centre = [min(e / 17, 1.0) * 3 for e in range(20)]
    assert ours == [[160, 160, 160, 192][round(c)] for c in centre] == [160] * 15 + [192] * 5
    ffcv = [ffcv_resolution(e, 160, 192, 13, 11) for e in range(16)]
    assert ours.count(192) / len(ours) == ffcv.count(192) / len(ffcv) == 0.25
    assert sizes.describe(0) == '160 px' and sizes.describe(19) == '192 px'


def test_the_loader_crops_every_batch_at_its_size_and_resumes_with_the_same_batches(tiny_data):
    """The uint8 batches the workers hand over: each at its scheduled size, the first equal to timm's float
    transform of the same seeded samples at that size, and a resumed epoch (set_epoch with skipped batches) handing
    the straight epoch's batches from there on, bit for bit."""
    args = sizes_args(tiny_data, [24, 40], 'constant')
    loader = build_loaders(args, 0, 1, CPU).train.loader
    loader.sampler.set_epoch(1)
    straight = list(loader)
    choices = TrainSizes(args, 40)(1)
    assert [tuple(images.shape[2:]) for images, _ in straight] == [(args.train_img_sizes[c],) * 2 for c in choices]

    reference_set = build_dataset(args, 'train')
    size = args.train_img_sizes[choices[0]]
    reference_set.transform = create_transform(size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                               hflip=0.5, color_jitter=None, interpolation='bilinear')
    sampler = ShardedSampler(len(reference_set), shuffle=True, seed=3, batch_size=8, seed_samples=True)
    sampler.set_epoch(1)
    keys = list(sampler)[:8]
    reference = torch.stack([SeededSamples(reference_set)[key][0] for key in keys])
    # timm's ToTensor and Normalize of the float pipeline against the worker's uint8, normalised here
    mean = torch.tensor(args.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(args.std).view(1, 3, 1, 1) * 255
    assert ((straight[0][0].float() - mean) / std - reference).abs().max() < 1e-5

    loader.sampler.set_epoch(1, skip_batches=29)
    resumed = list(loader)
    assert len(resumed) == len(straight) - 29
    for (images, targets), (expected_images, expected_targets) in zip(resumed, straight[29:]):
        assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)


def test_a_run_logs_the_size_each_epoch_trains_at(tiny_data, tmp_path):
    run_dir = tmp_path / 'run'
    assert train_in_process(*BASE, '--data-dir', tiny_data, '--output', run_dir, '--train-img-sizes', 24, 32,
                            '--train-size-schedule', 'progressive', '--train-size-schedule-spread', 0,
                            '--train-size-random-mix', 0) == 0
    log = (run_dir / 'train.log').read_text()
    assert re.findall(r'epoch (\d) trains at (.*)', log) == [('0', '24 px'), ('1', '32 px')]


@pytest.mark.parametrize('options,named', [
    (['--data-backend', 'dali'], '--train-img-sizes'),
    (['--dataset', 'cifar10'], '--train-img-sizes'),
    (['--train-size-probs', 1, 2, 3], '--train-size-probs'),
    (['--train-size-schedule', 'progressive', '--train-img-sizes', 24], '--train-img-sizes'),
    (['--train-size-random-mix', 1.5], '--train-size-random-mix'),
])
def test_sizes_the_suite_cannot_train_are_refused_with_one_line(tiny_data, tmp_path, options, named):
    result = run_main('train.py', '--config', SMOKE, '--data-dir', tiny_data, '--output', tmp_path / 'run',
                      '--train-img-sizes', 24, 32, *options, '--dry-run')
    assert result.returncode == 2
    assert one_line_error(result.stderr).startswith(f'error: {named}')
    assert not (tmp_path / 'run').exists()
