"""Input pipelines: ImageNet-layout folders (and CIFAR-10) through torchvision with timm's transforms, and synthetic
device data.

As timm's own loader does, workers decode and augment to uint8 tensors, and the batch is normalised on the device
after a non-blocking copy: timm's ``fast_collate`` and ``PrefetchLoader`` (with a CUDA stream that prefetches the
next batch where there is a GPU). A float32 image costs four times the bytes of its uint8 form in the workers, in
shared memory and over PCIe; normalising on the device is free next to the step. Every loader yields device batches:
images normalised in float32 (NCHW, channels-last strides with --channels-last), int64 targets.

The loader is built here rather than with timm's ``create_loader`` for two reasons the paper runs need: the training
sampler must resume mid-epoch at the exact sample position (preemption), and validation must see every image exactly
once across ranks (timm's distributed evaluation sampler pads with duplicates, which biases top-1 slightly).
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .distributed import barrier
from .errors import DataError, UsageError
from .preemption import ignore_stop_signals

log = logging.getLogger(__name__)
_MAX_WORKER_SLOTS = 256


def check_split(data_dir: str | os.PathLike, split: str) -> Path:
    """The folder ``data_dir/split`` must exist and hold class folders with images; name what is missing."""
    if not data_dir:
        raise UsageError('no --data-dir given (an ImageNet-layout folder with train/ and val/)')
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f'data directory not found: {root}')
    split_dir = root / split
    if not split_dir.is_dir():
        raise UsageError(f'{root}: no {split}/ folder (expected {split}/<class>/<image>.JPEG)')
    classes = [d for d in split_dir.iterdir() if d.is_dir()]
    if not classes:
        loose = any(f.suffix.lower() in IMG_EXTENSIONS for f in split_dir.iterdir())
        hint = ('; a raw ILSVRC2012 validation folder? scripts/prepare_imagenet.py sorts it into class folders'
                if loose else '')
        raise UsageError(f'{split_dir}: no class folders (expected {split}/<class>/<image>.JPEG){hint}')
    if not any(f.suffix.lower() in IMG_EXTENSIONS for d in classes for f in d.iterdir()):
        raise UsageError(f'{split_dir}: class folders hold no images ({", ".join(IMG_EXTENSIONS[:3])}, ...)')
    return split_dir


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def scan_image_folder(split_dir: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, label) samples of an ImageNet-layout split, in torchvision ImageFolder's order, without
    its two ways of mislabelling: ImageFolder follows every symbolic link, so a link inside one class folder that
    points into another class (or into the split itself) silently relabels that class's images, and a link to an
    ancestor folder loops. Here such links are reported with a warning and not followed; links that lead out of
    the split (to a shared store, as dataset managers make them) are followed. Labels are as ImageFolder gives
    them: class folders (links included) sorted by name."""
    split_dir = os.fspath(split_dir)
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    split_real = os.path.realpath(split_dir)
    class_reals = [os.path.realpath(os.path.join(split_dir, name)) for name in classes]
    samples, refused = [], []
    for label, (name, own_real) in enumerate(zip(classes, class_reals)):
        folders = {}  # folder path (as ImageFolder names it) -> image file names
        stack, visited = [(os.path.join(split_dir, name), own_real)], {own_real}
        while stack:
            folder, folder_real = stack.pop()
            files = folders.setdefault(folder, [])
            for entry in os.scandir(folder):
                real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(folder_real, entry.name)
                if entry.is_symlink() and os.path.exists(real) and not _inside(real, own_real) and (
                        _inside(real, split_real) or any(_inside(real, other) for other in class_reals)):
                    refused.append(f'{entry.path} -> {real} (outside its class folder)')
                elif entry.is_dir():
                    if real in visited:
                        refused.append(f'{entry.path} -> {real} (a loop)')
                    else:
                        visited.add(real)
                        stack.append((entry.path, real))
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    files.append(entry.name)
        samples += [(os.path.join(folder, f), label) for folder in sorted(folders) for f in sorted(folders[folder])]
    if refused:
        log.warning('%s: %d symbolic link(s) not followed, so that no image is read under another class: %s%s',
                    split_dir, len(refused), '; '.join(refused[:5]), '; ...' if len(refused) > 5 else '')
    return classes, samples


class ImageFolderWithRecovery(ImageFolder):
    """ImageFolder that survives unreadable files and does not follow links into other classes.

    Training (``replace=True``) logs the path and returns the next readable sample instead; validation
    (``replace=False``) returns a zero image with target -1 so that the evaluation counts it and leaves it out.
    ``strict=True`` raises DataError naming the file. ``unreadable_count()`` totals the files met so far over all
    worker processes (one shared-memory slot per worker, so that no two processes write the same number).
    """

    def __init__(self, root, transform, replace: bool, strict: bool, image_size: int):
        super().__init__(str(root), transform=transform, allow_empty=True)
        self.replace, self.strict, self.image_size = replace, strict, image_size
        self._unreadable = torch.zeros(_MAX_WORKER_SLOTS + 1, dtype=torch.int64).share_memory_()

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """ImageFolder's hook for the file scan (called by its constructor): ``scan_image_folder``."""
        return scan_image_folder(directory)[1]  # the same sorted class folders as ImageFolder's class_to_idx

    def unreadable_count(self) -> int:
        return int(self._unreadable.sum())

    def _count_unreadable(self):
        info = torch.utils.data.get_worker_info()
        self._unreadable[0 if info is None else 1 + info.id % _MAX_WORKER_SLOTS] += 1

    def _load(self, index):
        path, target = self.samples[index]
        try:
            with Image.open(path) as image:
                image.load()  # decoded while the file is open; convert() would copy an RGB image
                image = image if image.mode == 'RGB' else image.convert('RGB')
        except (OSError, ValueError, SyntaxError) as error:
            raise DataError(f'cannot read image {path}: {" ".join(str(error).split())}') from None
        return (self.transform(image) if self.transform else image), target

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            try:
                return self._load((index + attempt) % len(self.samples))
            except DataError as error:
                if self.strict:
                    raise
                self._count_unreadable()
                log.warning('%s; %s', error, 'using the next image' if self.replace else 'left out of the metrics')
                if not self.replace:
                    return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), -1
        raise DataError(f'{self.root}: no readable image')


class SeededSamples(Dataset):
    """Each sample's augmentation draws from its own generators, seeded by the (index, seed) key that a seeded
    ShardedSampler yields: the same whichever worker loads it and after any resume, which is what makes a resumed
    run bitwise the run that never stopped.

    In a worker process the global RNG state belongs to that worker alone and every sample reseeds it, so seeding is
    enough. In the main process (--workers 0) the state is the training's own (dropout, mixup): it is forked and
    restored around the sample. Only the CPU generator is seeded (the transforms draw from it and from ``random``):
    torch.manual_seed also seeds every accelerator backend, about 0.3 ms a call with a CUDA build, several percent of
    a worker's time per ImageNet image."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        if torch.utils.data.get_worker_info() is not None:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            return self.dataset[index]
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)


class ShardedSampler(Sampler):
    """Each rank's share of one epoch's permutation, resumable at any batch.

    The permutation depends only on (seed, epoch), so every rank and every restart sees the same order. Training pads
    the permutation by repeating its start until it divides by the world size (as DistributedSampler does: each rank
    then runs the same number of steps); validation (``pad=False``) shards without padding, so that every image is
    evaluated exactly once over all ranks. ``set_epoch(epoch, skip_batches)`` drops the batches a run already did.
    With ``seed_samples`` it yields (index, per-sample seed) pairs for SeededSamples.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 pad: bool = True, batch_size: int = 1, seed_samples: bool = False):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.pad, self.batch_size = shuffle, seed, pad, batch_size
        self.seed_samples = seed_samples
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.epoch, self.skip = epoch, skip_batches * self.batch_size

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            total = math.ceil(self.size / self.world_size) * self.world_size
            order += order[:total - len(order)]
        return order[self.rank::self.world_size][self.skip:]

    def __iter__(self):
        indices = self._indices()
        if self.seed_samples:
            base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
            return iter([(i, (base + i) % 2 ** 63) for i in indices])
        return iter(indices)

    def __len__(self):
        per_rank = math.ceil(self.size / self.world_size) if self.pad else len(range(self.rank, self.size,
                                                                                       self.world_size))
        return max(per_rank - self.skip, 0)


def build_transform(args, training: bool):
    """timm's ImageNet transforms with every setting explicit (the paper recipes differ from timm's defaults),
    ending in a uint8 CHW tensor: normalisation happens on the device (``use_prefetcher``, as timm's loader)."""
    if training:
        return create_transform(args.img_size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
                                hflip=args.hflip, color_jitter=args.color_jitter or None,
                                interpolation=args.train_interpolation, use_prefetcher=True)
    return create_transform(args.val_img_size or args.img_size, is_training=False, interpolation=args.interpolation,
                            crop_pct=args.crop_pct, use_prefetcher=True)


def build_dataset(args, split: str) -> ImageFolderWithRecovery:
    training = split == 'train'
    return ImageFolderWithRecovery(check_split(args.data_dir, split), build_transform(args, training),
                                   replace=training, strict=args.strict_data,
                                   image_size=args.img_size if training else args.val_img_size or args.img_size)


class FolderCIFAR10(CIFAR10):
    """torchvision's CIFAR-10 reader (the python-pickle batches in <root>/cifar-10-batches-py/). Its integrity check
    compares every file with the md5 of the official archive, which also refuses a copy in the same format made
    elsewhere (a re-packed mirror, a generated test set); here a local folder needs its files, and a download is
    still checked by torchvision against the archive's md5."""

    meta = {**CIFAR10.meta, 'md5': None}  # torchvision's check_integrity accepts any existing file without an md5

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)


def cifar_transform(args, training: bool):
    """The published code's CIFAR-10 augmentation (horizontal flip, 32 px random crop with 4 px zero padding), as
    uint8 CHW tensors like the ImageNet transforms."""
    if training:
        return transforms.Compose([transforms.RandomHorizontalFlip(args.hflip),
                                   transforms.RandomCrop(args.img_size, padding=4), transforms.PILToTensor()])
    return transforms.PILToTensor()


def build_cifar_dataset(args, split: str, rank: int = 0) -> FolderCIFAR10:
    """CIFAR-10's training set for 'train', its test set otherwise. With --dataset-download, rank 0 downloads it into
    --data-dir first."""
    if not args.data_dir:
        raise UsageError('no --data-dir given (the folder holding cifar-10-batches-py/, or where to download it)')
    training = split == 'train'
    if getattr(args, 'dataset_download', False) and rank == 0:
        try:
            FolderCIFAR10(args.data_dir, train=training, download=True)
        except OSError as error:  # no network, a full disk
            raise UsageError(f'could not download CIFAR-10 into {args.data_dir}: {error}') from None
    barrier()
    try:
        return FolderCIFAR10(args.data_dir, train=training, transform=cifar_transform(args, training))
    except RuntimeError:
        raise UsageError(f'{args.data_dir}: no CIFAR-10 in torchvision\'s format (cifar-10-batches-py/ with '
                         f'data_batch_1-5 and test_batch); pass --dataset-download to fetch it') from None


def device_loader(loader, args, device: torch.device) -> PrefetchLoader:
    """uint8 NCHW batches to normalised float32 on the device, the next batch prefetched on a CUDA stream (timm's).

    Channels-last comes after, in engine.to_device, as in timm's train.py: normalising an NHWC batch broadcasts
    mean and std along a contiguous dimension of 3, which a CPU runs about three times slower."""
    return PrefetchLoader(loader, mean=tuple(args.mean), std=tuple(args.std), device=device)


def _loader_options(args, device: torch.device) -> dict:
    # The loader's own generator: its worker seeds must not draw from (and so shift) the training RNG stream.
    return dict(num_workers=args.workers, pin_memory=device.type == 'cuda', persistent_workers=args.workers > 0,
                generator=torch.Generator().manual_seed(args.seed), worker_init_fn=ignore_stop_signals,
                collate_fn=fast_collate)


def build_val_loader(args, rank: int, world_size: int, device: torch.device, split: str = 'val'):
    """The evaluation loader of the torch backend, every image once over the ranks: (loader, dataset)."""
    dataset = build_cifar_dataset(args, split, rank) if getattr(args, 'dataset', None) == 'cifar10' else \
        build_dataset(args, split)
    loader = DataLoader(dataset, batch_size=args.batch_size, **_loader_options(args, device),
                        sampler=ShardedSampler(len(dataset), rank, world_size, shuffle=False, pad=False))
    return device_loader(loader, args, device), dataset


def check_same_classes(found: list[str], expected: list[str], where: str, expected_from: str) -> None:
    """A model evaluated on class folders other than those it was trained on reports a meaningless top-1: refuse."""
    if found != expected:
        different = sorted(set(found) ^ set(expected))
        example = f'e.g. {", ".join(different[:3])}' if different else 'the same names in another order'
        raise UsageError(f'{where}: class folders differ from those of {expected_from} ({len(found)} vs '
                         f'{len(expected)} classes; {example})')


@dataclass
class Loaders:
    train: object
    val: object
    classes: list[str]
    train_dataset: object = None  # the torch backend's, which counts unreadable images

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_torch_loaders(args, rank: int, world_size: int, device: torch.device) -> Loaders:
    cifar = args.dataset == 'cifar10'
    train_set = build_cifar_dataset(args, 'train', rank) if cifar else build_dataset(args, 'train')
    val, val_set = build_val_loader(args, rank, world_size, device)
    check_same_classes(train_set.classes, val_set.classes, f'{args.data_dir}/val', 'train/')
    train_sampler = ShardedSampler(len(train_set), rank, world_size, shuffle=True, seed=args.seed, pad=True,
                                   batch_size=args.batch_size, seed_samples=True)
    train = DataLoader(SeededSamples(train_set), batch_size=args.batch_size, sampler=train_sampler, drop_last=True,
                       **_loader_options(args, device))
    if len(train) == 0:
        raise UsageError(f'{args.data_dir}/train: {len(train_set)} images give no full batch of {args.batch_size} '
                         f'per rank over {world_size} rank(s)')
    return Loaders(device_loader(train, args, device), val, list(train_set.classes),
                   None if cifar else train_set)


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


def build_loaders(args, rank: int, world_size: int, device: torch.device) -> Loaders:
    """The seam between train.py and the input backends."""
    if args.data_backend == 'synthetic':
        classes = args.num_classes or 1000
        train = SyntheticLoader(args.batch_size, args.img_size, classes, args.synthetic_steps, device, args.seed)
        val = SyntheticLoader(args.batch_size, args.img_size, classes, max(1, args.synthetic_steps // 10), device)
        return Loaders(train, val, [f'class_{i}' for i in range(classes)])
    if args.data_backend == 'dali':
        if args.dataset != 'imagefolder':
            raise UsageError(f'--data-backend dali reads ImageNet-layout folders; --dataset {args.dataset} needs '
                             f'--data-backend torch')
        from .dali import build_dali_loaders
        return build_dali_loaders(args, rank, world_size, device)
    return build_torch_loaders(args, rank, world_size, device)
