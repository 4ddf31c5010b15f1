#!/usr/bin/env python3
"""Evaluate a checkpoint written by train.py: top-1, top-5, loss and logit statistics on an ImageFolder split.

    python validate.py --checkpoint RUN/best.pth --data-dir DIR [--split val] [--json]

The evaluation transform (image size, crop fraction, interpolation) and the model come from the checkpoint's own
configuration, so the numbers match what train.py logged for that epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from pgt.checkpoint import load_checkpoint
from pgt.data import ShardedSampler, build_dataset, check_same_classes
from pgt.distributed import init_distributed, shutdown
from pgt.engine import AMP_DTYPES, evaluate
from pgt.errors import UsageError, run_cli
from pgt.models import create_model, load_model_state
from pgt.preemption import ignore_stop_signals
from pgt.runlog import setup_logging


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--data-dir', required=True)
    p.add_argument('--split', default='val')
    p.add_argument('--data-backend', default='torch', choices=('torch', 'dali'))
    p.add_argument('--dali', dest='data_backend', action='store_const', const='dali',
                   help='alias of --data-backend dali')
    p.add_argument('--dali-device', choices=('gpu', 'cpu'), default=None,
                   help='DALI decoding device (default: gpu when CUDA is available)')
    p.add_argument('--batch-size', type=int, default=None, help='default: the training per-GPU batch')
    p.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: as in training, with the training's --amp-dtype)")
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
    p.add_argument('--debug', action='store_true')
    return p.parse_args(argv)


def main(argv) -> int:
    args = parse_args(argv)
    env = init_distributed()
    setup_logging(env.is_main)
    state = load_checkpoint(args.checkpoint)
    if 'args' not in state or 'classes' not in state:
        raise UsageError(f'{args.checkpoint}: no training configuration inside; was it written by train.py?')
    train_args = SimpleNamespace(**state['args'])
    batch_size = args.batch_size or train_args.batch_size
    loader, classes = build_loader(args, train_args, batch_size, env)
    check_same_classes(classes, state['classes'], f'{args.data_dir}/{args.split}', f'the checkpoint {args.checkpoint}')
    model = create_model(state['model_name'], num_classes=state['num_classes'])
    load_model_state(model, state, args.checkpoint, state['model_name'], state['num_classes'])
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    use_amp = train_args.amp if args.amp is None else args.amp
    amp_dtype = AMP_DTYPES[train_args.amp_dtype] if use_amp else None
    result = evaluate(model, loader, env.device, amp_dtype, args.channels_last)
    # (epoch, step) is where training continues: step 0 means after epoch - 1, a recovery checkpoint is within epoch
    epoch = state['epoch'] - 1 if state['step'] == 0 else state['epoch']
    result.update(checkpoint=str(args.checkpoint), epoch=epoch, step=state['step'], model=state['model_name'],
                  pgt_alpha=getattr(train_args, 'pgt_alpha', None))
    if env.is_main:
        print(json.dumps(result) if args.json else format_table(result))
    shutdown()
    return 0


def build_loader(args, train_args, batch_size: int, env):
    """The checkpoint's evaluation transform (size, crop fraction, interpolation) on the chosen backend; returns
    (loader, class names)."""
    data_args = SimpleNamespace(data_dir=args.data_dir, img_size=train_args.img_size, crop_pct=train_args.crop_pct,
                                interpolation=train_args.interpolation, strict_data=False, batch_size=batch_size,
                                workers=args.workers, seed=0, dali_device=args.dali_device,
                                channels_last=args.channels_last, amp=False)
    if args.data_backend == 'dali':
        from pgt.dali import build_dali_val_loader
        return build_dali_val_loader(data_args, env.rank, env.world_size, env.device, args.split)
    dataset = build_dataset(data_args, args.split)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=args.workers,
                        sampler=ShardedSampler(len(dataset), env.rank, env.world_size, shuffle=False, pad=False),
                        pin_memory=env.device.type == 'cuda', worker_init_fn=ignore_stop_signals)
    return loader, dataset.classes


def format_table(result: dict) -> str:
    width = max(map(len, result))
    return '\n'.join(f'{k:<{width}}  {v:.4f}' if isinstance(v, float) else f'{k:<{width}}  {v}'
                     for k, v in result.items())


if __name__ == '__main__':
    run_cli(main, sys.argv[1:])
