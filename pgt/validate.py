"""Evaluate a model on an ImageFolder split (or CIFAR-10's test set): top-1, top-5, loss and logit statistics.

    python validate.py --checkpoint RUN/best.pth --data-dir DIR [--split val] [--json]       (or pgt-validate)
    python validate.py --checkpoint output/train/.../model_best.pth.tar --data-dir /imagenet     (timm's train.py)
    python validate.py --model resnet50 --pretrained --data-dir /imagenet                        (timm's weights)

A checkpoint of this suite brings its model, classes and evaluation transform (size, crop fraction, interpolation,
normalisation), so the numbers match what train.py logged for that epoch. timm's own checkpoints (and the published
code's, written by a 2021 timm) and pretrained weights are evaluated with the model's default data configuration,
as timm's validate.py does. The options below override either.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from types import SimpleNamespace

import timm.data
import torch

from .checkpoint import load_weights
from .config import resolve_device_settings
from .folders import check_same_classes
from .loaders import build_val_loader
from .distributed import init_distributed, shutdown
from .engine import AMP_DTYPES, evaluate
from .errors import CliParser, UsageError, run_cli
from .models import create_model, load_model_state
from .runlog import setup_logging


def parse_args(argv):
    p = CliParser(description=__doc__)
    source = p.add_argument_group('what to evaluate (a checkpoint, or a timm model name)')
    source.add_argument('--checkpoint', help="this suite's, timm train.py's (.pth.tar) or a bare state dict")
    source.add_argument('--model', help="timm model name (default: the checkpoint's)")
    source.add_argument('--pretrained', action='store_true', help="timm's pretrained weights of --model")
    source.add_argument('--num-classes', type=int, default=None, help="default: the checkpoint's classifier")
    source.add_argument('--use-ema', action='store_true', help="a timm checkpoint's EMA weights")
    data = p.add_argument_group('data')
    data.add_argument('--data-dir', required=True)
    data.add_argument('--split', default='val')
    data.add_argument('--dataset', choices=('imagefolder', 'cifar10'), default=None,
                      help="default: the checkpoint's, else imagefolder")
    data.add_argument('--data-backend', default='torch', choices=('torch', 'dali'))
    data.add_argument('--dali', dest='data_backend', action='store_const', const='dali',
                      help='alias of --data-backend dali')
    data.add_argument('--dali-device', choices=('gpu', 'cpu'), default=None,
                      help='DALI decoding device (default: gpu when CUDA is available)')
    data.add_argument('--img-size', '--val-img-size', dest='val_img_size', type=int, default=None,
                      help="evaluation image size (default: the checkpoint's, else the model's)")
    data.add_argument('--crop-pct', type=float, default=None)
    data.add_argument('--interpolation', default=None)
    data.add_argument('--mean', type=float, nargs=3, default=None)
    data.add_argument('--std', type=float, nargs=3, default=None)
    data.add_argument('-b', '--batch-size', type=int, default=None,
                      help='default: the training per-GPU batch, else 128')
    data.add_argument('-j', '--workers', type=int, default=min(4, os.cpu_count() or 1))
    run = p.add_argument_group('run')
    run.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision (default: as the checkpoint's training, else off)")
    run.add_argument('--amp-dtype', choices=('auto', 'float16', 'bfloat16'), default=None)
    run.add_argument('--channels-last', action='store_true')
    run.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
    run.add_argument('--debug', action='store_true')
    args = p.parse_args(argv)
    check_values(args)
    if bool(args.checkpoint) == bool(args.pretrained):
        raise UsageError('give --checkpoint PATH, or --model NAME --pretrained (one of the two)')
    if args.pretrained and not args.model:
        raise UsageError('--pretrained needs --model NAME')
    return args


def check_values(args) -> None:
    """Sizes and counts that are given must be usable: 0 is not "the checkpoint's value", it is refused."""
    for dest, low in (('batch_size', 1), ('workers', 0), ('val_img_size', 1), ('num_classes', 1)):
        value = getattr(args, dest)
        if value is not None and value < low:
            raise UsageError(f'--{dest.replace("_", "-")}: must be >= {low}, got {value}')
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError(f'--crop-pct: must be in (0, 1], got {args.crop_pct}')
    for dest in ('mean', 'std'):
        values = getattr(args, dest)
        if values is not None and (not all(map(math.isfinite, values)) or (dest == 'std' and min(values) <= 0)):
            raise UsageError(f'--{dest}: must be finite{" and > 0" if dest == "std" else ""}, got {values}')


def build_model(args, weights: dict | None, info: dict):
    """(model, name, number of classes) from the checkpoint's weights or timm's pretrained ones."""
    name = args.model or info.get('arch')
    if not name:
        raise UsageError(f'{args.checkpoint} does not name its model; pass --model NAME')
    if args.pretrained:
        try:
            model = timm.create_model(name, pretrained=True, **({'num_classes': args.num_classes}
                                                                 if args.num_classes else {}))
        except Exception as error:  # no network, no weights for this name
            raise UsageError(f'cannot load the pretrained weights of {name}: {" ".join(str(error).split())[:200]}')
        return model, name, model.num_classes
    probe = create_model(name, num_classes=1000)  # only to find the classifier's name in the state dict
    classifier = weights.get(f'{probe.pretrained_cfg.get("classifier", "fc")}.weight')
    num_classes = args.num_classes or (classifier.shape[0] if classifier is not None else 1000)
    model = create_model(name, num_classes=num_classes, **(info.get('args') or {}).get('model_kwargs', {}))
    load_model_state(model, weights, args.checkpoint, name, num_classes)
    return model, name, num_classes


def data_settings(args, model, trained: dict) -> SimpleNamespace:
    """The evaluation transform: the options given, else the checkpoint's training configuration (this suite's),
    else the model's default data configuration (timm's resolve_data_config)."""
    own = dict(val_img_size=trained.get('val_img_size') or trained.get('img_size'), crop_pct=trained.get('crop_pct'),
               interpolation=trained.get('interpolation'), mean=trained.get('mean'), std=trained.get('std'))
    model_config = timm.data.resolve_data_config(model=model)
    defaults = dict(val_img_size=model_config['input_size'][-1], crop_pct=model_config['crop_pct'],
                    interpolation=model_config['interpolation'], mean=model_config['mean'], std=model_config['std'])
    chosen = {key: next(v for v in (getattr(args, key), own[key], defaults[key]) if v is not None) for key in own}
    return SimpleNamespace(**chosen, img_size=chosen['val_img_size'], data_dir=args.data_dir,
                           dataset=args.dataset or trained.get('dataset', 'imagefolder'), dataset_download=False,
                           strict_data=False, batch_size=args.batch_size or trained.get('batch_size', 128),
                           workers=args.workers, seed=0, data_backend=args.data_backend, dali_device=args.dali_device,
                           channels_last=args.channels_last)


def evaluate_checkpoint(args, env) -> dict:
    """The evaluation of ``args`` (parse_args' namespace) on this rank: top-1, top-5, loss, logit statistics, and
    what was evaluated (model, position, transform)."""
    weights, info = load_weights(args.checkpoint, args.use_ema) if args.checkpoint else (None, {})
    trained = (info.get('args') or {}) if info.get('classes') else {}  # only this suite's configuration is ours
    model, name, num_classes = build_model(args, weights, info)
    data_args = data_settings(args, model, trained)
    loader, classes = build_val_loader(data_args, env.rank, env.world_size, env.device, args.split)
    where = f'{args.data_dir}/{args.split}'
    if info.get('classes'):
        check_same_classes(classes, info['classes'], where, f'the checkpoint {args.checkpoint}')
    elif len(classes) != num_classes:
        raise UsageError(f'{where}: {len(classes)} class folders, but the model has {num_classes} classes')
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    use_amp = trained.get('amp', False) if args.amp is None else args.amp
    amp = SimpleNamespace(amp_dtype=args.amp_dtype or trained.get('amp_dtype', 'auto'), sync_bn=False)
    resolve_device_settings(amp, env.device)
    result = evaluate(model, loader, env.device, AMP_DTYPES[amp.amp_dtype] if use_amp else None,
                      args.channels_last, progress=env.is_main)
    result.update(checkpoint=str(args.checkpoint) if args.checkpoint else None, model=name,
                  pretrained=args.pretrained, pgt_alpha=trained.get('pgt_alpha'), **position(info),
                  img_size=data_args.val_img_size, crop_pct=data_args.crop_pct, interpolation=data_args.interpolation)
    return result


def main(argv) -> int:
    args = parse_args(argv)
    env = init_distributed()
    setup_logging(env.is_main)
    result = evaluate_checkpoint(args, env)
    if env.is_main:
        print(json.dumps(result) if args.json else format_table(result))
    shutdown()
    return 0


def position(info: dict) -> dict:
    """Where in training the weights come from: the epoch (0-based, as timm and summary.csv count them) and, for a
    checkpoint written within its epoch (recovery.pth), the updates done in it; step None at an epoch end, and for
    timm's checkpoints, which record the epoch only."""
    epoch, step, total = info.get('epoch'), info.get('step'), info.get('epoch_steps')
    if step is None:
        return {'epoch': epoch, 'step': None}
    if total is None:  # written before 0.3: the position where training continues
        return {'epoch': epoch - 1 if step == 0 else epoch, 'step': step or None}
    return {'epoch': epoch, 'step': None if step >= total else step}


def format_table(result: dict) -> str:
    width = max(map(len, result))
    return '\n'.join(f'{k:<{width}}  {v:.4f}' if isinstance(v, float) else f'{k:<{width}}  {v}'
                     for k, v in result.items())


def cli() -> None:
    """The ``pgt-validate`` console command (and ``python validate.py`` from a clone)."""
    run_cli(main, sys.argv[1:])


if __name__ == '__main__':
    cli()
