"""The one face of the input backends: train.py, validate.py and the tools ask here for loaders, and this module picks
the backend (``--data-backend``): torch (pgt.data: DataLoader workers), dali (pgt.dali: NVIDIA DALI pipelines) or
synthetic (one random device batch, for measuring the step alone). A backend hands a pgt.folders.SplitLoader per
split.

Every loader built here yields device batches: images normalised in float32 (NCHW; the training loop makes them
channels-last where asked, after normalising), int64 targets. The backends hand uint8 batches; ``device_loader``
normalises them on the device after a non-blocking copy, with timm's PrefetchLoader (which also prefetches the next
batch on a CUDA stream where there is a GPU).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data.loader import PrefetchLoader

from .checkpoint import CheckpointWriteError, write_atomic
from .config import train_image_sizes
from .data import ShardedSampler, torch_train_loader, torch_val_loader
from .distributed import computed_on_main
from .errors import UsageError
from .folders import ImageIndex, check_same_classes, check_split, scan_image_folder

log = logging.getLogger(__name__)
SHARED_MEMORY = '/dev/shm'
PREFETCH_FACTOR = 2  # DataLoader's default: batches in flight per worker


@dataclass
class Loaders:
    train: object
    val: object
    classes: list[str]
    train_images: int = 0  # in the whole split, over all ranks
    val_images: int = 0
    train_dataset: object = None  # the torch backend's, which counts unreadable images
    indexes: dict[str, ImageIndex] = field(default_factory=dict)  # the splits' images (ImageNet-layout folders)
    scanned: tuple[str, ...] = ()  # the splits whose index is a new scan, to be saved in the run directory
    train_sizes: object = None  # --train-img-sizes: each epoch's training sizes (pgt.data.TrainSizes)

    @functools.cached_property
    def train_digest(self) -> str | None:
        # hashed once: at ImageNet's size a digest reads some 50 MB, and the start-up and the resume check ask for it
        return self.indexes['train'].digest() if 'train' in self.indexes else None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def device_loader(loader, args, device: torch.device) -> PrefetchLoader:
    """uint8 NCHW batches to normalised float32 on the device, the next batch prefetched on a CUDA stream (timm's).

    Channels-last comes after, in engine.to_device, as in timm's train.py: normalising an NHWC batch broadcasts
    mean and std along a contiguous dimension of 3, which a CPU runs about three times slower."""
    return PrefetchLoader(loader, mean=tuple(args.mean), std=tuple(args.std), device=device)


class SyntheticLoader:
    """The same random batch ``steps`` times, made on the device: measures the step without any input cost."""

    def __init__(self, batch_size: int, img_size: int, num_classes: int, steps: int, device, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
        self.targets = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        self.steps = steps
        self.sampler = ShardedSampler(steps * batch_size, batch_size=batch_size, shuffle=False)
        self.batch_size = batch_size

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        for _ in range(len(self)):
            yield self.images, self.targets


def cap_workers(args) -> None:
    """At most as many workers as CPUs this process may use (its affinity, which a batch system sets): more only
    compete for them, and a large --workers under a process limit fails to fork. Says so when it caps."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    if args.workers > available:
        log.warning('--workers %d is more than the %d CPU(s) this process may use: %d workers', args.workers,
                    available, available)
        args.workers = available


def check_shared_memory(args, val_img_size: int) -> None:
    """The torch backend's workers hand their batches over in shared memory (/dev/shm): up to two batches per
    worker at a time. When the batches of every rank of this node cannot fit there (a container's default is 64 MB),
    the workers fail to allocate it and the run would wait for their batches forever: refuse it now, saying what to
    change."""
    if args.workers == 0 or not os.path.isdir(SHARED_MEMORY):
        return
    image = 3 * max(*train_image_sizes(args), val_img_size) ** 2  # uint8 CHW
    ranks = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    needed = ranks * args.workers * PREFETCH_FACTOR * args.batch_size * (image + 8)
    free = shutil.disk_usage(SHARED_MEMORY).free
    if needed > free:
        raise UsageError(f'{SHARED_MEMORY} has {free / 2**20:.1f} MiB free, and {ranks} rank(s) x {args.workers} '
                         f'loader workers x {PREFETCH_FACTOR} batches of {args.batch_size} images need about '
                         f'{needed / 2**20:.1f} MiB there; give the container more (docker run --shm-size=8g, or '
                         f'--ipc=host), or lower --workers (0 needs none) or --batch-size')


def _backend(args):
    """The backend module's (train loader, val loader) builders for --data-backend."""
    if args.data_backend != 'dali':
        return torch_train_loader, torch_val_loader
    if getattr(args, 'dataset', 'imagefolder') != 'imagefolder':
        raise UsageError(f'--data-backend dali reads ImageNet-layout folders; --dataset {args.dataset} needs '
                         f'--data-backend torch')
    from .dali import dali_train_loader, dali_val_loader  # DALI is optional: imported only when asked for
    return dali_train_loader, dali_val_loader


def _index(args, split: str, saved: Path | None) -> tuple[ImageIndex, bool]:
    """(the split's index, whether it is a new scan): the one saved in the run directory while the folders it was
    made from have not changed, else a scan."""
    split_dir = check_split(args.data_dir, split)
    if saved is not None and saved.is_file():
        try:
            index = ImageIndex.load(saved)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # damaged: scanned again
            log.warning('%s cannot be read (%s); scanning %s again', saved, ' '.join(str(error).split())[:120],
                        split_dir)
        else:
            if index.is_current(str(split_dir)):
                log.info('%s: %d images listed by %s (its folders unchanged since)', split_dir, len(index), saved)
                return index, False
            log.info('%s changed since %s was saved: scanning it again', split_dir, saved)
    log.info('scanning %s', split_dir)
    return scan_image_folder(split_dir), True


def split_indexes(args, splits: tuple[str, ...], is_main: bool, index_dir: Path | None = None) -> dict:
    """{split: (ImageIndex, new scan?)} for ImageNet-layout folders: rank 0 reads the indexes saved in
    ``index_dir`` (a restart's run directory) that are still current, scans the others, and hands them to every
    rank: one scan per run and split, not one per rank and restart."""
    if getattr(args, 'dataset', 'imagefolder') != 'imagefolder':
        return {}
    return computed_on_main(lambda: {split: _index(args, split, index_dir / f'{split}.npz' if index_dir else None)
                                     for split in splits}, is_main)


def save_indexes(loaders: Loaders, index_dir: Path) -> None:
    """The newly scanned indexes into the run directory, for the restarts (rank 0). They only save a restart its
    scan, so a failed write (a full disk) is a warning: the checkpoints are what must not fail, and they say so
    themselves. A killed write leaves a temporary file, removed here."""
    try:
        index_dir.mkdir(exist_ok=True)
        for orphan in index_dir.glob('.*.tmp'):
            orphan.unlink(missing_ok=True)
        for split, index in loaders.indexes.items():
            if split in loaders.scanned or not (index_dir / f'{split}.npz').is_file():
                write_atomic(index_dir / f'{split}.npz', index.save())
    except (OSError, CheckpointWriteError) as error:
        log.warning('the index of the data could not be saved (%s): a restart will scan the data again', error)


def build_val_loader(args, rank: int, world_size: int, device: torch.device, split: str = 'val'):
    """The evaluation loader alone (validate.py), every image once over the ranks: (device loader, class names)."""
    cap_workers(args)
    if args.data_backend != 'dali':
        check_shared_memory(args, args.val_img_size)
    index = split_indexes(args, (split,), rank == 0).get(split, (None, False))[0]
    split_loader = _backend(args)[1](args, rank, world_size, device, split, index=index)
    return device_loader(split_loader.loader, args, device), split_loader.classes


def build_loaders(args, rank: int, world_size: int, device: torch.device, index_dir: Path | None = None) -> Loaders:
    """The training and evaluation loaders of a run, their class lists checked against each other; the splits'
    indexes from ``index_dir`` where they are still current (split_indexes)."""
    if args.data_backend == 'synthetic':
        classes = args.num_classes or 1000
        train = SyntheticLoader(args.batch_size, args.img_size, classes, args.synthetic_steps, device, args.seed)
        val = SyntheticLoader(args.batch_size, args.img_size, classes, max(1, args.synthetic_steps // 10), device)
        return Loaders(train, val, [f'class_{i}' for i in range(classes)], len(train) * args.batch_size,
                       len(val) * args.batch_size)
    cap_workers(args)
    if args.data_backend != 'dali':
        check_shared_memory(args, args.val_img_size or args.img_size)
    train_builder, val_builder = _backend(args)
    indexes = split_indexes(args, ('train', 'val'), rank == 0, index_dir)
    train = train_builder(args, rank, world_size, device, index=indexes.get('train', (None, False))[0])
    val = val_builder(args, rank, world_size, device, index=indexes.get('val', (None, False))[0])
    check_same_classes(val.classes, train.classes, f'{args.data_dir}/val', 'train/')
    if len(train.loader) == 0:
        raise UsageError(f'{args.data_dir}/train: {train.images} images give no full batch of {args.batch_size} per '
                         f'rank over {world_size} rank(s)')
    return Loaders(device_loader(train.loader, args, device), device_loader(val.loader, args, device), train.classes,
                   train.images, val.images, train.counting, {split: index for split, (index, _) in indexes.items()},
                   tuple(split for split, (_, new) in indexes.items() if new), train.sizes)
