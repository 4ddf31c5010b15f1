"""The check to run on a new cluster node before spending GPU-days on it: a pass/fail table in a few minutes.

    pgt-preflight --config configs/paper/resnet50-cosine-pgt.yaml --data-dir /imagenet      (or scripts/preflight.py)

It checks the data tree (class and image counts against ImageNet-1k's, a sample of files decoded by the recipe's
backend), each CUDA path the recipes use (float16 autocast with the gradient scaler skipping a forced overflow,
bfloat16 where the hardware has it, fused SGD, channels-last, torch.compile of the training step, NCCL and gloo
collectives when several GPUs are visible, DALI's GPU decoding with its hardware decoder), measures the recipe's
training step and loader briefly, and projects the recipe's GPU-hours from the slower of the two. On a machine
without CUDA the CUDA checks are listed as skipped, with the reason. Exit code 1 if a check failed.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from .config import finalize_args, parse_config, resolve_device_settings, train_image_sizes
from .errors import CliParser, UsageError, run_cli

IMAGENET = {'classes': 1000, 'train': 1_281_167, 'val': 50_000}


@dataclass
class Check:
    name: str
    status: str  # 'pass', 'fail', 'warn' or 'skip'
    detail: str


def _cuda_skip(name: str) -> Check | None:
    return None if torch.cuda.is_available() else Check(name, 'skip', 'no CUDA device on this machine')


# ---- data

def check_data_tree(args) -> tuple[Check, int, list[str]]:
    """Class and image counts of train/ and val/ (the suite's own scan, pgt.folders) against ImageNet-1k's; returns
    the check, the number of training images and 64 of them at random."""
    from .folders import check_split, scan_image_folder
    scans = {split: scan_image_folder(check_split(args.data_dir, split)) for split in ('train', 'val')}
    counts = {split: (len(index.classes), len(index)) for split, index in scans.items()}
    detail = (f'train {counts["train"][0]} classes, {counts["train"][1]:,} images; val {counts["val"][0]} classes, '
              f'{counts["val"][1]:,} images')
    index = scans['train']
    files = [index.path(i) for i in random.Random(0).sample(range(len(index)), min(64, len(index)))]
    if counts['train'][0] != counts['val'][0]:
        return Check('data: tree', 'fail', f'{detail}: train/ and val/ have different classes'), len(index), files
    expected = (IMAGENET['classes'], IMAGENET['train']), (IMAGENET['classes'], IMAGENET['val'])
    if (counts['train'], counts['val']) == expected:
        return Check('data: tree', 'pass', f'{detail} (ImageNet-1k)'), len(index), files
    return Check('data: tree', 'warn', f'{detail}; ImageNet-1k has 1000 classes, 1,281,167 train and 50,000 val '
                                       f'images (fine for a subset, not for the papers\' numbers)'), len(index), files


def check_decoding(args, files: list[str], sample: int = 64) -> Check:
    """A random sample of training files decoded by the recipe's backend."""
    chosen = files[:sample]
    if args.data_backend == 'dali':
        from .dali import first_undecodable
        bad = first_undecodable(chosen)  # PIL, as DALI's own failure path does; DALI decoding is its own check
    else:
        from PIL import Image
        bad = None
        for path in chosen:
            try:
                with Image.open(path) as image:
                    image.convert('RGB')
            except Exception as error:
                bad = (path, ' '.join(str(error).split()))
                break
    if bad:
        return Check('data: decoding', 'fail', f'cannot decode {bad[0]}: {bad[1]}')
    return Check('data: decoding', 'pass', f'{len(chosen)} random training files decoded')


# ---- CUDA paths

def _tiny_model(device, channels_last=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def check_float16_scaler() -> Check:
    """float16 autocast; a forced overflow makes the gradient scaler skip the step (weights unchanged) and halve
    its scale, and a finite step then changes the weights."""
    name = 'cuda: float16 + gradient scaler'
    if (skip := _cuda_skip(name)) is not None:
        return skip
    from .engine import BufferGuard, TrainingParts, make_scaler, train_step
    device = torch.device('cuda')
    model = _tiny_model(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    parts = TrainingParts(model, torch.nn.CrossEntropyLoss(), optimizer, make_scaler(device, torch.float16),
                          torch.float16, buffer_guard=BufferGuard(model))
    images, targets = torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 10, (8,), device=device)
    before = [p.detach().clone() for p in model.parameters()]
    scale = parts.scaler.get_scale()
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float('inf')
    *_, norm = train_step(parts, [(poisoned, targets)], device)
    skipped = not torch.isfinite(norm) and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    halved = parts.scaler.get_scale() == scale / 2
    train_step(parts, [(images, targets)], device)
    moved = not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    ok = skipped and halved and moved
    return Check(name, 'pass' if ok else 'fail', f'overflow skipped: {skipped}, scale halved: {halved}, finite step '
                                                 f'applied: {moved}')


def check_bfloat16() -> Check:
    name = 'cuda: bfloat16'
    if (skip := _cuda_skip(name)) is not None:
        return skip
    from .config import auto_amp_dtype
    capability = torch.cuda.get_device_capability()
    if auto_amp_dtype('cuda', capability) != 'bfloat16':
        return Check(name, 'skip', f'compute capability {capability[0]}.{capability[1]} has no bfloat16 hardware '
                                   f'(emulated only): --amp-dtype auto picks float16 here')
    a, b = torch.randn(256, 256, device='cuda'), torch.randn(256, 256, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        product = a @ b
    error = float((product.float() - a @ b).abs().max() / (a @ b).abs().max())
    ok = product.dtype == torch.bfloat16 and error < 2e-2
    return Check(name, 'pass' if ok else 'fail', f'autocast matmul in {product.dtype}, relative error {error:.1e}')


def check_fused_sgd() -> Check:
    """The fused Nesterov SGD that the recipes use on CUDA takes the same step as the unfused one."""
    name = 'cuda: fused SGD'
    if (skip := _cuda_skip(name)) is not None:
        return skip
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        w = torch.randn(1000, device='cuda', requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused)
        for _ in range(3):
            w.grad = torch.randn_like(w)
            opt.step()
        weights.append(w.detach())
    error = float((weights[0] - weights[1]).abs().max())
    return Check(name, 'pass' if error < 1e-6 else 'fail', f'fused vs unfused after 3 steps: {error:.1e}')


def check_channels_last() -> Check:
    name = 'cuda: channels-last'
    if (skip := _cuda_skip(name)) is not None:
        return skip
    x = torch.randn(8, 3, 32, 32, device='cuda')
    plain, last = _tiny_model('cuda').eval(), _tiny_model('cuda', channels_last=True).eval()
    with torch.no_grad():
        error = float((plain(x) - last(x.contiguous(memory_format=torch.channels_last))).abs().max())
    return Check(name, 'pass' if error < 1e-3 else 'fail', f'NHWC vs NCHW outputs differ by {error:.1e}')


def check_compile() -> Check:
    """torch.compile of the model, one training step (inductor: the first compilation takes a minute)."""
    name = 'cuda: torch.compile'
    if (skip := _cuda_skip(name)) is not None:
        return skip
    from .engine import TrainingParts, make_scaler, train_step
    device = torch.device('cuda')
    model = _tiny_model(device)
    parts = TrainingParts(torch.compile(model), torch.nn.CrossEntropyLoss(),
                          torch.optim.SGD(model.parameters(), lr=0.1), make_scaler(device, None))
    batch = (torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 10, (8,), device=device))
    start = time.perf_counter()
    *_, norm = train_step(parts, [batch], device)
    ok = bool(torch.isfinite(norm))
    return Check(name, 'pass' if ok else 'fail', f'compiled step in {time.perf_counter() - start:.0f} s')


def _collective_worker(rank: int, world_size: int, port: int, results):
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group('cpu:gloo,cuda:nccl', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                            world_size=world_size, device_id=torch.device('cuda', rank))
    on_gpu = torch.ones(1, device='cuda') * (rank + 1)
    on_cpu = torch.ones(1) * (rank + 1)
    dist.all_reduce(on_gpu)
    dist.all_reduce(on_cpu)
    results[rank] = (float(on_gpu), float(on_cpu))
    dist.barrier()
    dist.destroy_process_group()


def check_collectives() -> Check:
    """An NCCL all-reduce of a CUDA tensor and a gloo all-reduce of a CPU tensor in the default group the training
    uses ('cpu:gloo,cuda:nccl'), over every visible GPU."""
    name = 'cuda: NCCL + gloo all-reduce'
    if (skip := _cuda_skip(name)) is not None:
        return skip
    count = torch.cuda.device_count()
    if count < 2:
        return Check(name, 'skip', 'one GPU visible: no collective to test')
    import torch.multiprocessing as mp
    from torch.distributed.elastic.utils.distributed import get_free_port
    results = mp.Manager().dict()
    mp.spawn(_collective_worker, args=(count, get_free_port(), results), nprocs=count)
    expected = count * (count + 1) / 2
    ok = all(value == (expected, expected) for value in results.values()) and len(results) == count
    return Check(name, 'pass' if ok else 'fail', f'{count} GPUs, sums {dict(results)} (expected {expected:g})')


def check_dali_gpu(files: list[str]) -> Check:
    """DALI decoding on the GPU with the hardware JPEG decoder, on a sample of training files."""
    name = 'cuda: DALI GPU decoding'
    if (skip := _cuda_skip(name)) is not None:
        return skip
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        return Check(name, 'skip', 'NVIDIA DALI is not installed (pip install -r requirements-dali.txt)')
    sample = files[:64]

    @pipeline_def(batch_size=16, num_threads=4, device_id=torch.cuda.current_device())
    def pipeline():
        jpegs, _ = fn.readers.file(files=sample, labels=[0] * len(sample))
        return fn.decoders.image(jpegs, device='mixed', output_type=types.RGB, hw_decoder_load=0.99)

    try:
        pipe = pipeline()
        pipe.build()
        images, = pipe.run()
    except Exception as error:
        return Check(name, 'fail', ' '.join(str(error).split())[:200])
    return Check(name, 'pass', f'{len(images)} images decoded on the GPU (mixed decoder, hw_decoder_load 0.99)')


# ---- throughput and the projection

def measure_step(args, device, steps: int) -> float:
    """Images/s of the recipe's training step (its model, per-GPU batch, size, precision) on synthetic data."""
    from .engine import AMP_DTYPES, TrainingParts, make_scaler, train_step
    from .models import create_model
    from .optim import build_optimizer
    from .transform import PowerGradCrossEntropy
    model = create_model(args.model, num_classes=1000, **args.model_kwargs).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    amp = AMP_DTYPES[args.amp_dtype] if args.amp else None
    parts = TrainingParts(model, PowerGradCrossEntropy(args.pgt_alpha or 1.0, args.smoothing,
                                                       check_targets=device.type != 'cuda'),
                          build_optimizer(model, args, device), make_scaler(device, amp), amp,
                          channels_last=args.channels_last)
    size = max(train_image_sizes(args))  # the largest batch is the slowest
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = (images, torch.randint(0, 1000, (args.batch_size,), device=device))
    times = []
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        train_step(parts, [batch], device)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(times)


def measure_loader(args, device, batches: int) -> float:
    """Images/s of the recipe's training loader on the data tree (after its first batch)."""
    from .loaders import build_loaders
    loader = build_loaders(args, 0, 1, device).train
    loader.sampler.set_epoch(0)
    count, start, seen = 0, None, 0
    for images, _ in loader:
        count += 1
        if count == 1:
            start = time.perf_counter()
        else:
            seen += images.shape[0]
        if count > batches:
            break
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start) if seen else 0.0


# A CPU's images/s hardly depends on the batch beyond a few dozen images, and a paper recipe's (1024 at 224 px) would
# take minutes per step and gigabytes of memory there: the CPU measures at this batch instead, and says so.
CPU_BATCH = 32


def throughput_checks(args, device, quick: bool, train_images: int) -> tuple[list[Check], float | None]:
    """The step and loader rates, and the projected GPU-hours of the recipe from the slower of the two."""
    from .optim import total_epochs
    measured, note = args, ''
    if device.type == 'cpu' and args.batch_size > CPU_BATCH:
        measured = argparse.Namespace(**{**vars(args), 'batch_size': CPU_BATCH})
        note = f"; batch {CPU_BATCH}, not the recipe's {args.batch_size}: a CPU measures at a small batch"
    step_check, step = _measured('speed: training step', lambda: measure_step(measured, device, 3 if quick else 20),
                                 f'({args.model}, batch {measured.batch_size}, {max(train_image_sizes(args))} px, on '
                                 f'{device}{note})')
    loader_check, loader = _measured('speed: loader', lambda: measure_loader(measured, device, 3 if quick else 20),
                                     f'({args.data_backend} backend, {args.workers} workers)')
    rates = {name: rate for name, rate in (('step', step), ('loader', loader)) if rate}
    if not rates:
        return [step_check, loader_check, Check('projection', 'fail', 'neither the step nor the loader ran')], None
    bound, rate = min(rates.items(), key=lambda item: item[1])
    epochs = total_epochs(args)
    hours = epochs * train_images / rate / 3600
    unit = device.type.upper()
    projection = Check('projection', 'pass', f'{epochs} epochs x {train_images:,} images at {rate:,.0f} img/s per '
                                             f'{unit} ({bound}-bound): {hours:,.2f} {unit}-hours')
    return [step_check, loader_check, projection], hours


def _measured(name: str, measure, detail: str) -> tuple[Check, float | None]:
    """A rate's row: pass with the images/s, or fail with the one-line reason (an unreadable tree, memory); the
    other rows are still measured."""
    try:
        rate = measure()
    except Exception as error:
        return Check(name, 'fail', ' '.join(str(error).split())[:200]), None
    return Check(name, 'pass' if rate > 0 else 'fail', f'{rate:,.0f} img/s {detail}'), rate or None


def run_checks(args, quick: bool) -> list[Check]:
    device = torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')
    tree, train_images, files = check_data_tree(args)
    checks = [tree, check_decoding(args, files), check_float16_scaler(), check_bfloat16(), check_fused_sgd(),
              check_channels_last(), check_compile(), check_collectives(), check_dali_gpu(files)]
    speed, _ = throughput_checks(args, device, quick, train_images)
    return checks + speed


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f'{"check":<{width}}  status  detail', f'{"-" * width}  ------  ------']
    return '\n'.join(lines + [f'{c.name:<{width}}  {c.status:<6}  {c.detail}' for c in checks])


def parse_args(argv):
    p = CliParser(description=__doc__)
    p.add_argument('-c', '--config', required=True, help='the recipe to check this node for')
    p.add_argument('--data-dir', required=True)
    p.add_argument('--quick', action='store_true', help='3 timed steps and batches instead of 20 (default on a CPU)')
    p.add_argument('--debug', action='store_true')
    known, rest = p.parse_known_args(argv)
    return known, rest


def main(argv) -> int:
    known, rest = parse_args(argv)
    args = finalize_args(parse_config(['--config', known.config, '--data-dir', known.data_dir, *rest]),
                         world_size=int(os.environ.get('WORLD_SIZE', 1)))
    if args.dataset != 'imagefolder':
        raise UsageError('pgt-preflight checks ImageNet-layout data trees; this recipe reads --dataset '
                         f'{args.dataset}')
    device = torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')
    args.sync_bn = False  # one process here: nothing to synchronise
    resolve_device_settings(args, device)
    checks = run_checks(args, quick=known.quick or device.type != 'cuda')
    print(format_table(checks))
    skipped = [c for c in checks if c.status == 'skip']
    if skipped:
        print(f'\n{len(skipped)} check(s) skipped: they need a CUDA GPU (or DALI); run this on the GPU node')
    sys.stdout.flush()
    return 1 if any(c.status == 'fail' for c in checks) else 0


def cli() -> None:
    """The ``pgt-preflight`` console command (and ``python scripts/preflight.py``)."""
    run_cli(main)


if __name__ == '__main__':
    cli()
