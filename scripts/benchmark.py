#!/usr/bin/env python3
"""Throughput benchmarks: the training step, the loss, the input pipelines, and train.py end to end.

    python scripts/benchmark.py step --models resnet50 --batch-size 256 --amp-dtypes bfloat16 --channels-last
    python scripts/benchmark.py step --timm-like --models resnet50 --img-size 224     # like timm's benchmark.py
    python scripts/benchmark.py loss --loss-shapes 256x1000 1024x1000 --amp-dtypes float32 bfloat16
    python scripts/benchmark.py loader --data-dir /imagenet --backends torch reference dali-cpu dali-gpu
    python scripts/benchmark.py e2e --generate 160 --against-timm /path/to/timm/train.py
    python scripts/benchmark.py startup --images 1281167 --workers 4 --tree /tmp/linktree
    python scripts/benchmark.py all --tiny --json out.json        # every mode in seconds on a CPU

`step` times pgt.engine.train_step, the function train.py runs, on synthetic device data: cross-entropy and PGT in
alternating blocks (so that drift of the machine hits both alike), eager and compiled, for each precision; it reports
the median and the mean images/s over timed steps (device synchronised after each step) and the PGT overhead.
``--timm-like`` times what timm's benchmark.py times: SGD without weight decay, no total-norm pass, no loss scaler.
`loss` times the PGT loss (forward and backward) against F.cross_entropy on random logits, alternating rounds.
`loader` reports images/s of each input pipeline on a JPEG tree (``--generate N`` writes one of ImageNet-like
sizes): this suite's torch backend (uint8 workers, normalised on the device), the same without per-sample seeding
(``torch-unseeded``: the cost of exact resume), a plain torchvision ImageFolder with timm's float transform
(``reference``), and DALI on the CPU and the GPU.
`e2e` runs train.py for one epoch on a JPEG tree and on synthetic data and compares its logged images/s with the
`step` figure for the same settings; with ``--against-timm PATH`` it instead times train.py and timm's train.py (the
script at PATH) as whole processes on the same tree and settings, alternating, and prints the ratio of wall times.
`diagnostics` times one diagnostics probe against the median training step and reports the share of an epoch it
costs at ``--interval``.
`startup` builds (or, with ``--tree``, reuses) a tree of ``--images`` hard links to tiny JPEGs and times, alternating,
the building of the training set's list: the suite's scan, the suite's saved index (read and checked current),
torchvision's ImageFolder and timm's ImageDataset; then the proportional set size (PSS) of a process tree holding the
suite's index or ImageFolder's list, alone and with ``--workers`` forked processes that have each read every sample.
Temporary trees and run folders are removed, whatever happens.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from pgt import PowerGradCrossEntropy, power_grad_cross_entropy
from pgt.data import ShardedSampler, SeededSamples, _loader_options, build_dataset
from pgt.loaders import build_loaders, device_loader
from pgt.engine import AMP_DTYPES, TrainingParts, make_scaler, train_step
from pgt.errors import CliParser, UsageError, run_cli
from pgt.models import create_model
from pgt.optim import build_optimizer
from pgt.runlog import read_summary

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {'float32': None, **AMP_DTYPES}
TINY = dict(models=['test_resnet'], batch_size=8, img_size=32, steps=4, warmup=2, blocks=2, loader_batches=3,
            generate=48, loss_shapes=['16x10'], rounds=3, repeats=1, images=2000)


def parse_args(argv):
    p = CliParser(description=__doc__)
    p.add_argument('mode', choices=('step', 'loss', 'loader', 'e2e', 'diagnostics', 'startup', 'all'))
    p.add_argument('--images', type=int, default=1_281_167, help='startup: training images in the hard-link tree')
    p.add_argument('--tree', help='startup: where the hard-link tree is built, or reused (default: a temporary one)')
    p.add_argument('--interval', type=int, default=200, help='diagnostics interval for the diagnostics mode')
    p.add_argument('--tiny', action='store_true', help='CPU-sized settings that run every mode in seconds')
    p.add_argument('--models', nargs='+', default=['resnet50', 'resnet18'])
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--amp-dtypes', nargs='+', default=None, choices=list(DTYPES),
                   help='default: bfloat16 on GPUs that support it, else float32')
    p.add_argument('--compile', nargs='+', default=['eager'], choices=('eager', 'compiled'))
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--timm-like', action='store_true',
                   help="step: no weight decay, no total-norm pass, no loss scaler (timm's benchmark.py step)")
    p.add_argument('--alpha', type=float, default=0.3)
    p.add_argument('--steps', type=int, default=20, help='timed steps per block')
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--blocks', type=int, default=3, help='alternating cross-entropy / PGT blocks')
    p.add_argument('--loss-shapes', nargs='+', default=['256x1000', '1024x1000'], metavar='NxC')
    p.add_argument('--rounds', type=int, default=25, help='loss: alternating rounds of 10 calls each')
    p.add_argument('--data-dir', help='JPEG tree (ImageNet layout) for loader and e2e')
    p.add_argument('--generate', type=int, default=0, metavar='N', help='write N ImageNet-sized JPEGs to use instead')
    p.add_argument('--backends', nargs='+', default=['torch', 'torch-unseeded', 'reference', 'dali-cpu', 'dali-gpu'])
    p.add_argument('--workers', type=int, default=8)
    p.add_argument('--loader-batches', type=int, default=50)
    p.add_argument('--against-timm', metavar='TRAIN_PY', help="e2e: time timm's train.py (this path) against train.py")
    p.add_argument('--timm-args', default='', help="e2e --against-timm: extra arguments for timm's train.py")
    p.add_argument('--e2e-epochs', type=int, default=2)
    p.add_argument('--repeats', type=int, default=3, help='loader, e2e --against-timm: alternating runs of each')
    p.add_argument('--json', metavar='FILE', help='also write the results as JSON')
    p.add_argument('--debug', action='store_true')
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
        args.workers = 2
        args.generate = args.generate or (TINY['generate'] if not args.data_dir else 0)
    return args


def device_and_dtypes(args):
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    bf16 = device.type == 'cuda' and torch.cuda.get_device_capability(device) >= (8, 0)
    return device, args.amp_dtypes or (['bfloat16'] if bf16 else ['float32'])


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def build_parts(model_name, args, device, amp_dtype, compiled, alpha):
    model = create_model(model_name, num_classes=1000).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    opts = SimpleNamespace(opt='sgd', lr=0.1, weight_decay=0.0 if args.timm_like else 5e-4, momentum=0.9)
    optimizer = build_optimizer(model, opts, device)
    trained = torch.compile(model) if compiled else model
    loss_fn = PowerGradCrossEntropy(alpha, check_targets=device.type != 'cuda')
    scaler = torch.amp.GradScaler(device.type, enabled=False) if args.timm_like else make_scaler(device, amp_dtype)
    return TrainingParts(trained, loss_fn, optimizer, scaler, amp_dtype, channels_last=args.channels_last,
                         track_grad_norm=not args.timm_like)


def synthetic_batch(args, device):
    """One random batch on the device, in the layout the model trains in."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)


def step_inputs(args):
    """The device, the precisions to time and the synthetic batch of the step and diagnostics modes."""
    device, dtypes = device_and_dtypes(args)
    return device, dtypes, synthetic_batch(args, device)


def time_steps(parts, batch, device, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(parts, [batch], device)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def bench_step(args) -> list[dict]:
    """Cross-entropy (alpha 1) and PGT (alpha) on the same model and batch, in alternating blocks."""
    device, dtypes, batch = step_inputs(args)
    results = []
    for model_name in args.models:
        for dtype_name in dtypes:
            for mode in args.compile:
                parts = build_parts(model_name, args, device, DTYPES[dtype_name], mode == 'compiled', args.alpha)
                times = {'ce': [], 'pgt': []}
                time_steps(parts, batch, device, args.warmup)
                for _ in range(args.blocks):
                    for loss, alpha in (('ce', 1.0), ('pgt', args.alpha)):
                        parts.loss_fn.alpha = alpha
                        times[loss] += time_steps(parts, batch, device, args.steps)
                median = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
                mean = {k: args.batch_size / statistics.mean(v) for k, v in times.items()}
                results.append({'mode': 'step', 'model': model_name, 'amp_dtype': dtype_name, 'compile': mode,
                                'timm_like': args.timm_like, 'batch_size': args.batch_size, 'img_size': args.img_size,
                                'channels_last': args.channels_last, 'device': device_name(device),
                                'ce_img_per_sec': median['ce'], 'pgt_img_per_sec': median['pgt'],
                                'ce_img_per_sec_mean': mean['ce'], 'pgt_img_per_sec_mean': mean['pgt'],
                                'pgt_overhead_pct': 100 * (median['ce'] / median['pgt'] - 1),
                                'timed_steps': len(times['ce'])})
    return results


def bench_loss(args) -> list[dict]:
    """PGT's forward and backward against F.cross_entropy's on the same logits, in alternating rounds.

    Half-precision logits are timed under autocast, as the training step (and timm's train.py) calls the loss:
    autocast runs F.cross_entropy in float32 there. ``ce_native_ms`` is F.cross_entropy outside autocast, in the
    logits' own dtype, which no training step runs; it is reported for completeness."""
    device, _ = device_and_dtypes(args)
    results = []
    for shape in args.loss_shapes:
        n, c = map(int, shape.split('x'))
        for dtype_name in args.amp_dtypes or ['float32', 'bfloat16']:
            dtype = DTYPES[dtype_name] or torch.float32
            gen = torch.Generator().manual_seed(0)
            logits = (3 * torch.randn(n, c, generator=gen)).to(device=device, dtype=dtype)
            target = torch.randint(0, c, (n,), generator=gen).to(device)
            autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                        else contextlib.nullcontext())
            losses = {'ce': lambda z: F.cross_entropy(z, target),
                      'pgt': lambda z: power_grad_cross_entropy(z, target, args.alpha, check_targets=False)}
            if dtype != torch.float32:
                losses['ce_native'] = losses['ce']  # run outside autocast, below
            times = {name: [] for name in losses}
            for round_ in range(args.rounds + 1):  # round 0 warms up
                for name, loss_fn in losses.items():
                    start = time.perf_counter()
                    for _ in range(10):
                        leaf = logits.detach().requires_grad_(True)
                        with contextlib.nullcontext() if name == 'ce_native' else autocast:
                            loss = loss_fn(leaf)
                        loss.backward()
                    synchronize(device)
                    if round_:
                        times[name].append((time.perf_counter() - start) / 10)
            ms = {f'{name}_ms': 1e3 * statistics.median(values) for name, values in times.items()}
            results.append({'mode': 'loss', 'shape': shape, 'dtype': dtype_name, 'device': device_name(device),
                            **ms, 'pgt_over_ce': ms['pgt_ms'] / ms['ce_ms'], 'rounds': args.rounds})
    return results


def bench_diagnostics(args) -> list[dict]:
    from pgt.diagnostics import Diagnostics
    device, dtypes, batch = step_inputs(args)
    results = []
    for model_name in args.models:
        parts = build_parts(model_name, args, device, DTYPES[dtypes[0]], False, args.alpha)
        with tempfile.TemporaryDirectory() as tmp:
            diag = Diagnostics(parts.model, parts.loss_fn, batch, 2, Path(tmp), SimpleNamespace(
                scalar=lambda *a: None, histogram=lambda *a: None))
            time_steps(parts, batch, device, args.warmup)
            step = statistics.median(time_steps(parts, batch, device, args.steps * args.blocks))
            parts.grad_observer = diag.observe_grads
            probes = []
            for _ in range(args.blocks):
                start = time.perf_counter()
                losses, logits, _ = train_step(parts, [batch], device)  # update 2k+1: keeps its gradient
                losses, logits, _ = train_step(parts, [batch], device)  # update 2k+2: step-consistency
                diag.after_step(0, 0, losses[0], logits[0])
                synchronize(device)
                probes.append(time.perf_counter() - start - 2 * step)
        probe = statistics.median(probes)
        results.append({'mode': 'diagnostics', 'model': model_name, 'amp_dtype': dtypes[0],
                        'batch_size': args.batch_size, 'img_size': args.img_size, 'step_seconds': step,
                        'probe_seconds': probe, 'interval': args.interval,
                        'overhead_pct': 100 * probe / (args.interval * step)})
    return results


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'


def generate_tree(root: Path, count: int) -> Path:
    """ImageNet-like JPEGs: about 500x375, 10 classes, in train/ and val/."""
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for split, n in (('train', count), ('val', max(count // 5, 10))):
        for i in range(n):
            folder = root / split / f'n{i % 10:08d}'
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(375, 500, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f'{i}.JPEG', quality=90)
    return root


def loader_args(args, data_dir, backend):
    dali_device = {'dali-cpu': 'cpu', 'dali-gpu': 'gpu'}.get(backend)
    return SimpleNamespace(data_dir=str(data_dir), data_backend='dali' if dali_device else 'torch',
                           dataset='imagefolder', dali_device=dali_device, batch_size=args.batch_size,
                           workers=args.workers, seed=0, img_size=args.img_size, val_img_size=args.img_size,
                           crop_pct=0.875, interpolation='bilinear', train_interpolation='bilinear',
                           scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, color_jitter=0.0, strict_data=False,
                           num_classes=None, channels_last=args.channels_last, amp=False, amp_dtype='float16',
                           mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def training_loader(args, data_dir, backend, device):
    """The training loader of a backend, yielding normalised float batches on the device."""
    options = loader_args(args, data_dir, backend)
    if backend == 'reference':  # what a plain torchvision + timm script does: float tensors from the workers
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder
        transform = create_transform(args.img_size, is_training=True, interpolation='bilinear', hflip=0.5,
                                     color_jitter=None)
        return torch.utils.data.DataLoader(ImageFolder(str(Path(data_dir) / 'train'), transform), shuffle=True,
                                           batch_size=args.batch_size, num_workers=args.workers, drop_last=True,
                                           pin_memory=device.type == 'cuda', persistent_workers=args.workers > 0)
    if backend == 'torch-unseeded':  # the torch backend without per-sample seeds: what exact resume costs
        dataset = build_dataset(options, 'train')
        sampler = ShardedSampler(len(dataset), shuffle=True, batch_size=args.batch_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                             **_loader_options(options, device))
        return device_loader(loader, options, device)
    if backend == 'torch':
        dataset = build_dataset(options, 'train')
        sampler = ShardedSampler(len(dataset), shuffle=True, batch_size=args.batch_size, seed_samples=True)
        loader = torch.utils.data.DataLoader(SeededSamples(dataset), batch_size=args.batch_size, sampler=sampler,
                                             drop_last=True, **_loader_options(options, device))
        return device_loader(loader, options, device)
    return build_loaders(options, 0, 1, device).train


def loader_rate(args, data_dir, backend, device) -> float:
    """Images/s of one backend's training loader over --loader-batches batches, the first (start-up) not timed."""
    loader = training_loader(args, data_dir, backend, device)
    count, start, total = 0, None, 0
    for epoch in range(1000):
        if hasattr(loader.sampler, 'set_epoch'):
            loader.sampler.set_epoch(epoch)
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            count += 1
            if count == 2:  # the first batch carries start-up (workers, pipeline build)
                synchronize(device)
                start = time.perf_counter()
            elif count > 2:
                total += images.shape[0]
            if count > args.loader_batches:
                break
        if count > args.loader_batches:
            break
    synchronize(device)
    rate = total / (time.perf_counter() - start) if start else 0.0
    del loader  # stops its persistent workers before the next backend (or the temporary tree) goes
    return rate


def bench_loader(args, data_dir) -> list[dict]:
    """Each backend --repeats times, in alternation (drift of a shared machine hits all alike); medians."""
    device, _ = device_and_dtypes(args)
    rates, errors = {backend: [] for backend in args.backends}, {}
    for _ in range(args.repeats):
        for backend in args.backends:
            if backend in errors:
                continue
            try:
                rates[backend].append(loader_rate(args, data_dir, backend, device))
            except UsageError as error:
                errors[backend] = str(error)
    results = []
    for backend in args.backends:
        row = {'mode': 'loader', 'backend': backend, 'batch_size': args.batch_size, 'workers': args.workers}
        if backend in errors:
            results.append({**row, 'error': errors[backend]})
        else:
            results.append({**row, 'img_per_sec': statistics.median(rates[backend]), 'repeats': len(rates[backend])})
    reference = next((r['img_per_sec'] for r in results if r['backend'] == 'reference' and 'error' not in r), None)
    for row in results:
        if reference and 'img_per_sec' in row:
            row['vs_reference'] = row['img_per_sec'] / reference
    return results


def e2e_argv(args, model_name, data_dir, output, backend, dtype_name, epochs: int, alpha: float | None) -> list[str]:
    argv = ['--data-dir', str(data_dir), '--data-backend', backend, '--output', str(output), '--model', model_name,
            '--batch-size', str(args.batch_size), '--img-size', str(args.img_size), '--epochs', str(epochs),
            '--warmup-epochs', '0', '--workers', str(args.workers), '--color-jitter', '0',
            '--train-interpolation', 'bilinear', '--log-interval', '1000000',
            '--synthetic-steps', str(args.warmup + args.steps * args.blocks),
            '--channels-last' if args.channels_last else '--no-channels-last']
    if alpha is not None:
        argv += ['--pgt-alpha', str(alpha)]
    if DTYPES[dtype_name] is not None:
        argv += ['--amp', '--amp-dtype', dtype_name]
    return argv


def bench_e2e(args, data_dir, step_results) -> list[dict]:
    """train.py itself for one epoch, on the JPEG tree and on synthetic device data, against the step figure: the
    synthetic run checks that train.py's logged images/s is honest, the JPEG run how much the input costs."""
    from pgt import train  # train.py's own main, in this process
    _, dtypes = device_and_dtypes(args)
    results = []
    for model_name in args.models:
        step = next((r['pgt_img_per_sec'] for r in step_results if r['model'] == model_name), None)
        for backend in ('torch', 'synthetic'):
            with tempfile.TemporaryDirectory(prefix='pgt-e2e-') as tmp:
                out = Path(tmp) / 'run'
                train.main(e2e_argv(args, model_name, data_dir, out, backend, dtypes[0], 1, args.alpha))
                rate = float(read_summary(out)[0]['train_img_per_sec'])
            results.append({'mode': 'e2e', 'backend': backend, 'model': model_name, 'amp_dtype': dtypes[0],
                            'batch_size': args.batch_size, 'img_per_sec': rate, 'step_img_per_sec': step,
                            'fraction_of_step': rate / step if step else None})
    return results


def timm_argv(args, model_name, data_dir, output) -> list[str]:
    """timm's train.py with the settings of e2e_argv: the same model, batch, size, epochs, workers, schedule and
    augmentation (no colour jitter, bilinear crops), cross-entropy with timm's default smoothing as ours."""
    argv = ['--data-dir', str(data_dir), '--train-split', 'train', '--val-split', 'val', '--model', model_name,
            '--batch-size', str(args.batch_size), '--img-size', str(args.img_size), '--epochs', str(args.e2e_epochs),
            '--warmup-epochs', '0', '--workers', str(args.workers), '--color-jitter', '0',
            '--train-interpolation', 'bilinear', '--log-interval', '1000000', '--output', str(output),
            '--experiment', 'run', *shlex.split(args.timm_args)]
    return argv + (['--channels-last'] if args.channels_last else [])


def bench_against_timm(args, data_dir) -> list[dict]:
    """Wall time of whole processes, alternating train.py and timm's train.py (PGT off: the same loss)."""
    _, dtypes = device_and_dtypes(args)
    results = []
    for model_name in args.models:
        times = {'pgt': [], 'timm': []}
        for _ in range(args.repeats):
            for name in ('pgt', 'timm'):
                with tempfile.TemporaryDirectory(prefix='pgt-vs-timm-') as tmp:
                    if name == 'pgt':
                        command = [sys.executable, str(ROOT / 'train.py'), '--smoothing', '0.1', *e2e_argv(
                            args, model_name, data_dir, Path(tmp) / 'run', 'torch', dtypes[0], args.e2e_epochs, None)]
                    else:
                        command = [sys.executable, args.against_timm, *timm_argv(args, model_name, data_dir, tmp)]
                    start = time.perf_counter()
                    subprocess.run(command, check=True, capture_output=True, cwd=tmp,
                                   env={**os.environ, 'PYTHONUNBUFFERED': '1'})
                    times[name].append(time.perf_counter() - start)
        ratios = [ours / theirs for ours, theirs in zip(times['pgt'], times['timm'])]
        results.append({'mode': 'e2e-vs-timm', 'model': model_name, 'batch_size': args.batch_size,
                        'img_size': args.img_size, 'epochs': args.e2e_epochs, 'workers': args.workers,
                        'train_py_seconds': statistics.median(times['pgt']),
                        'timm_seconds': statistics.median(times['timm']),
                        'ratio': statistics.median(ratios),  # pair by pair: drift of the machine cancels
                        'runs': times})
    return results


# ---- startup: the scan of a training set of ImageNet's size, and what its sample list costs in every worker

def link_tree(root: Path, images: int) -> Path:
    """An ImageNet-sized tree that costs no disk: train/<class>/ with ``images`` files in all (1,000 classes, fewer
    for a small tree), hard links to one small valid JPEG per class, its folders dated an hour back as a data set's
    are (pgt.folders.RACY_NS). Reused when ``root`` already holds one of that size."""
    from PIL import Image
    train = root / 'train'
    classes = min(1000, max(1, images // 20))
    per_class = [images // classes + (k < images % classes) for k in range(classes)]
    marker = root / f'.images-{images}'
    if marker.exists():
        return train
    for k, count in enumerate(per_class):
        folder = train / f'n{k:08d}'
        folder.mkdir(parents=True, exist_ok=True)
        source = root / f'.source-{k}.JPEG'
        Image.new('RGB', (8, 8), (k % 256, 0, 0)).save(source)
        for i in range(count):
            target = folder / f'n{k:08d}_{i}.JPEG'
            if not target.exists():
                os.link(source, target)
    then = time.time() - 3600
    for folder in (train, *train.iterdir()):
        os.utime(folder, (then, then))
    marker.touch()
    return train


def _build_listing(kind: str, train: Path, saved: Path | None = None):
    """The training set's list, as each contender builds it: the suite's scan, the suite's saved index (read and
    checked current), torchvision's ImageFolder, timm's ImageDataset."""
    from pgt.folders import ImageIndex, scan_image_folder
    if kind == 'suite-scan':
        return scan_image_folder(train)
    if kind == 'suite-index':
        index = ImageIndex.load(saved)
        assert index.is_current(str(train)), 'the saved index is not current'
        return index
    if kind == 'torchvision':
        from torchvision.datasets import ImageFolder
        return ImageFolder(str(train))
    import timm.data
    return timm.data.ImageDataset(str(train))


def startup_times(args, train: Path, saved: Path) -> list[dict]:
    """Seconds to build the training set's list, each contender in turn, ``--repeats`` rounds (alternating, so that
    the machine's drift hits all alike); the median of each."""
    kinds = ('suite-scan', 'suite-index', 'torchvision', 'timm')
    times = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            start = time.perf_counter()
            listing = _build_listing(kind, train, saved)
            times[kind].append(time.perf_counter() - start)
            del listing
    scan = statistics.median(times['torchvision'])
    return [{'mode': 'startup', 'what': kind, 'images': args.images, 'seconds': statistics.median(values),
             'vs_torchvision': statistics.median(values) / scan, 'runs': values} for kind, values in times.items()]


def _pss_of_tree(pid: int) -> int:
    """Proportional set size (bytes) of a process and its children: shared pages counted once over all sharers."""
    total = 0
    for proc in [pid, *map(int, Path(f'/proc/{pid}/task/{pid}/children').read_text().split())]:
        for line in Path(f'/proc/{proc}/smaps_rollup').read_text().splitlines():
            if line.startswith('Pss:'):
                total += int(line.split()[1]) * 1024
    return total


def _read_every_sample(listing, done, release) -> None:
    """A worker's reading of the list: every path and label once, as a DataLoader worker does over an epoch."""
    indexed = hasattr(listing, 'path')
    for i in range(len(listing)):
        if indexed:
            listing.path(i), int(listing.labels[i])
        else:
            listing.samples[i]  # the (path, label) tuple: reading it writes its reference count
    done.set()
    release.wait()


def worker_memory(kind: str, train: str, saved: str, workers: int) -> dict:
    """Run in a process of its own: PSS of it alone after building the list, then of it and ``workers`` forked
    processes that have each read every sample."""
    import multiprocessing
    listing = _build_listing(kind, Path(train), Path(saved))
    alone = _pss_of_tree(os.getpid())
    context = multiprocessing.get_context('fork')
    release, events = context.Event(), [context.Event() for _ in range(workers)]
    processes = [context.Process(target=_read_every_sample, args=(listing, done, release)) for done in events]
    for process in processes:
        process.start()
    for done in events:
        done.wait()
    together = _pss_of_tree(os.getpid())
    release.set()
    for process in processes:
        process.join()
    return {'pss_alone_mib': alone / 2**20, 'pss_with_workers_mib': together / 2**20,
            'per_worker_mib': (together - alone) / workers / 2**20}


def bench_startup(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix='pgt-startup-') as tmp:
        root = Path(args.tree) if args.tree else Path(tmp)
        train = link_tree(root, args.images)
        saved = Path(tmp) / 'train.npz'
        from pgt.folders import scan_image_folder
        saved.write_bytes(scan_image_folder(train).save())
        results = startup_times(args, train, saved)
        for kind in ('suite-index', 'torchvision'):
            measured = subprocess.run([sys.executable, __file__, 'startup-memory', kind, str(train), str(saved),
                                       str(args.workers)], capture_output=True, text=True, check=True)
            results.append({'mode': 'startup-memory', 'what': kind, 'images': args.images, 'workers': args.workers,
                            **json.loads(measured.stdout.splitlines()[-1])})
    return results


def print_table(results):
    for row in results:
        print('  '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))


def main(argv) -> int:
    if argv[:1] == ['startup-memory']:  # one measurement of bench_startup, in a process of its own
        print(json.dumps(worker_memory(argv[1], argv[2], argv[3], int(argv[4]))))
        return 0
    args = parse_args(argv)
    results = []
    if args.mode in ('step', 'all') or (args.mode == 'e2e' and not args.against_timm):
        results += bench_step(args)
    if args.mode in ('loss', 'all'):
        results += bench_loss(args)
    if args.mode in ('diagnostics', 'all'):
        results += bench_diagnostics(args)
    if args.mode in ('startup', 'all'):
        results += bench_startup(args)
    if args.mode in ('loader', 'e2e', 'all'):
        with tempfile.TemporaryDirectory(prefix='pgt-bench-') as tmp:
            data_dir = Path(args.data_dir) if args.data_dir else None
            if args.generate:
                data_dir = generate_tree(Path(tmp) / 'jpegs', args.generate)
            if data_dir is None:
                raise UsageError('loader and e2e need --data-dir or --generate N')
            if args.mode in ('loader', 'all'):
                results += bench_loader(args, data_dir)
            if args.mode == 'e2e' and args.against_timm:
                results += bench_against_timm(args, data_dir)
            elif args.mode in ('e2e', 'all'):
                results += bench_e2e(args, data_dir, [r for r in results if r['mode'] == 'step'])
    if args.mode == 'e2e':
        results = [r for r in results if r['mode'].startswith('e2e')]
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({'date': time.strftime('%Y-%m-%d'), 'argv': argv,
                                               'torch': torch.__version__, 'results': results}, indent=1))
    return 0


if __name__ == '__main__':
    run_cli(main)
