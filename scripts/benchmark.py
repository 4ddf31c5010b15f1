#!/usr/bin/env python3
"""Throughput benchmarks: the training step, the input pipelines, and train.py end to end.

    python scripts/benchmark.py step --model resnet50 --batch-size 256 --amp-dtype bfloat16 --channels-last
    python scripts/benchmark.py loader --data-dir /imagenet --backends torch dali-cpu dali-gpu
    python scripts/benchmark.py e2e --data-dir /imagenet --model resnet50 --batch-size 256
    python scripts/benchmark.py all --tiny --json out.json        # every mode in seconds on a CPU

`step` times pgt.engine.train_step, the function train.py runs, on synthetic device data: cross-entropy and PGT in
alternating blocks (so that drift of the machine hits both alike), eager and compiled, for each precision; it reports
the median images/s over timed steps (device synchronised after each step) and the PGT overhead in percent.
`loader` reports images/s of each data backend on a JPEG tree (``--generate N`` writes one of ImageNet-like sizes).
`e2e` runs train.py on a JPEG tree and compares its logged images/s with the `step` figure for the same settings.
`diagnostics` times one diagnostics probe (pgt.diagnostics) against the median training step and reports the share
of an epoch it costs at ``--interval``: probe / (interval x step), a decomposition that whole-run timings on a noisy
machine cannot resolve.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pgt import PowerGradCrossEntropy  # noqa: E402
from pgt.data import build_loaders  # noqa: E402
from pgt.engine import AMP_DTYPES, TrainingParts, make_scaler, train_step  # noqa: E402
from pgt.errors import UsageError, run_cli  # noqa: E402
from pgt.models import create_model  # noqa: E402
from pgt.optim import build_optimizer  # noqa: E402
from pgt.runlog import read_summary  # noqa: E402

DTYPES = {'float32': None, **AMP_DTYPES}
TINY = dict(models=['resnet18'], batch_size=8, img_size=32, steps=4, warmup=2, blocks=2, loader_batches=3,
            generate=48)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('mode', choices=('step', 'loader', 'e2e', 'diagnostics', 'all'))
    p.add_argument('--interval', type=int, default=200, help='diagnostics interval for the diagnostics mode')
    p.add_argument('--tiny', action='store_true', help='CPU-sized settings that run every mode in seconds')
    p.add_argument('--models', nargs='+', default=['resnet50', 'resnet18'])
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--amp-dtypes', nargs='+', default=None, choices=list(DTYPES),
                   help='default: bfloat16 on GPUs that support it, else float32')
    p.add_argument('--compile', nargs='+', default=['eager'], choices=('eager', 'compiled'))
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=True)
    p.add_argument('--alpha', type=float, default=0.3)
    p.add_argument('--steps', type=int, default=20, help='timed steps per block')
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--blocks', type=int, default=3, help='alternating cross-entropy / PGT blocks')
    p.add_argument('--data-dir', help='JPEG tree (ImageNet layout) for loader and e2e')
    p.add_argument('--generate', type=int, default=0, metavar='N', help='write N ImageNet-sized JPEGs to use instead')
    p.add_argument('--backends', nargs='+', default=['torch', 'dali-cpu', 'dali-gpu'])
    p.add_argument('--workers', type=int, default=8)
    p.add_argument('--loader-batches', type=int, default=50)
    p.add_argument('--json', metavar='FILE', help='also write the results as JSON')
    p.add_argument('--debug', action='store_true')
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.batch_size, args.img_size = TINY['models'], TINY['batch_size'], TINY['img_size']
        args.steps, args.warmup, args.blocks = TINY['steps'], TINY['warmup'], TINY['blocks']
        args.loader_batches, args.workers = TINY['loader_batches'], 2
        args.generate = args.generate or (TINY['generate'] if not args.data_dir else 0)
    return args


def device_and_dtypes(args):
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dtypes = args.amp_dtypes or (['bfloat16'] if device.type == 'cuda' and torch.cuda.is_bf16_supported()
                                 else ['float32'])
    return device, dtypes


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def build_parts(model_name, args, device, amp_dtype, compiled, alpha):
    model = create_model(model_name, num_classes=1000).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    opts = SimpleNamespace(opt='sgd', lr=0.1, weight_decay=5e-4, momentum=0.9)
    optimizer = build_optimizer(model, opts, device)
    trained = torch.compile(model) if compiled else model
    loss_fn = PowerGradCrossEntropy(alpha, check_targets=device.type != 'cuda')
    return TrainingParts(trained, loss_fn, optimizer, make_scaler(device, amp_dtype), amp_dtype,
                         channels_last=args.channels_last)


def synthetic_batch(args, device):
    """One random batch on the device, in the layout the model trains in."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)


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
    device, dtypes = device_and_dtypes(args)
    batch = synthetic_batch(args, device)
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
                rate = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
                results.append({'mode': 'step', 'model': model_name, 'amp_dtype': dtype_name, 'compile': mode,
                                'batch_size': args.batch_size, 'img_size': args.img_size,
                                'channels_last': args.channels_last, 'device': device_name(device),
                                'ce_img_per_sec': rate['ce'], 'pgt_img_per_sec': rate['pgt'],
                                'pgt_overhead_pct': 100 * (rate['ce'] / rate['pgt'] - 1),
                                'timed_steps': len(times['ce'])})
    return results


def bench_diagnostics(args) -> list[dict]:
    from pgt.diagnostics import Diagnostics
    device, dtypes = device_and_dtypes(args)
    batch = synthetic_batch(args, device)
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
                           dali_device=dali_device, batch_size=args.batch_size, workers=args.workers, seed=0,
                           img_size=args.img_size, crop_pct=0.875, interpolation='bilinear',
                           train_interpolation='bilinear', scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5,
                           color_jitter=0.0, strict_data=False, num_classes=None, channels_last=args.channels_last,
                           amp=False, amp_dtype='float16')


def bench_loader(args, data_dir) -> list[dict]:
    device, _ = device_and_dtypes(args)
    results = []
    for backend in args.backends:
        row = {'mode': 'loader', 'backend': backend, 'batch_size': args.batch_size, 'workers': args.workers}
        try:
            loader = build_loaders(loader_args(args, data_dir, backend), 0, 1, device).train
        except UsageError as error:
            results.append({**row, 'error': str(error)})
            continue
        count, start, total = 0, None, 0
        for epoch in range(1000):
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
        results.append({**row, 'img_per_sec': total / (time.perf_counter() - start) if start else 0.0})
        del loader  # stops its persistent workers before the next backend (or the temporary tree) goes
    return results


def bench_e2e(args, data_dir, step_results) -> list[dict]:
    """train.py itself for one epoch, on the JPEG tree and on synthetic device data, against the step figure: the
    synthetic run checks that train.py's logged images/s is honest, the JPEG run how much the input costs."""
    import train  # train.py's own main, in this process
    _, dtypes = device_and_dtypes(args)
    results = []
    for model_name in args.models:
        step = next((r['pgt_img_per_sec'] for r in step_results if r['model'] == model_name), None)
        for backend in ('torch', 'synthetic'):
            out = Path(tempfile.mkdtemp(prefix='pgt-e2e-')) / 'run'
            argv = ['--data-dir', str(data_dir), '--data-backend', backend, '--output', str(out), '--model',
                    model_name, '--batch-size', str(args.batch_size), '--img-size', str(args.img_size),
                    '--epochs', '1', '--warmup-epochs', '0', '--workers', str(args.workers),
                    '--pgt-alpha', str(args.alpha), '--color-jitter', '0', '--train-interpolation', 'bilinear',
                    '--log-interval', '1000000', '--synthetic-steps', str(args.warmup + args.steps * args.blocks),
                    '--channels-last' if args.channels_last else '--no-channels-last']
            if DTYPES[dtypes[0]] is not None:
                argv += ['--amp', '--amp-dtype', dtypes[0]]
            train.main(argv)
            rate = float(read_summary(out)[0]['train_img_per_sec'])
            results.append({'mode': 'e2e', 'backend': backend, 'model': model_name, 'amp_dtype': dtypes[0],
                            'batch_size': args.batch_size, 'img_per_sec': rate, 'step_img_per_sec': step,
                            'fraction_of_step': rate / step if step else None})
    return results


def print_table(results):
    for row in results:
        print('  '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))


def main(argv) -> int:
    args = parse_args(argv)
    results = []
    if args.mode in ('step', 'all', 'e2e'):
        results += bench_step(args)
    if args.mode in ('diagnostics', 'all'):
        results += bench_diagnostics(args)
    if args.mode in ('loader', 'e2e', 'all'):
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(args.data_dir) if args.data_dir else None
            if args.generate:
                data_dir = generate_tree(Path(tmp) / 'jpegs', args.generate)
            if data_dir is None:
                raise UsageError('loader and e2e need --data-dir or --generate N')
            if args.mode in ('loader', 'all'):
                results += bench_loader(args, data_dir)
            if args.mode in ('e2e', 'all'):
                results += bench_e2e(args, data_dir, [r for r in results if r['mode'] == 'step'])
    if args.mode == 'e2e':
        results = [r for r in results if r['mode'] == 'e2e']
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({'date': time.strftime('%Y-%m-%d'), 'argv': argv,
                                               'torch': torch.__version__, 'results': results}, indent=1))
    return 0


if __name__ == '__main__':
    run_cli(main)
