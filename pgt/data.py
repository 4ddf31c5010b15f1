"""The torch input backend (``--data-backend torch``): ImageNet-layout folders (and CIFAR-10) through torchvision with
timm's transforms, in DataLoader worker processes.

As timm's own loader does, workers decode and augment to uint8 tensors, collated by timm's ``fast_collate``; the
batch is normalised on the device after a non-blocking copy (pgt.loaders.device_loader). A float32 image costs four
times the bytes of its uint8 form in the workers, in shared memory and over PCIe; normalising on the device is free
next to the step.

The loader is built here rather than with timm's ``create_loader`` for two reasons the paper runs need: the training
sampler must resume mid-epoch at the exact sample position (preemption), and validation must see every image exactly
once across ranks (timm's distributed evaluation sampler pads with duplicates, which biases top-1 slightly).
"""
from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from timm.data import ScheduledBatchSampler, ScheduledTransformDataset, create_transform
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import CIFAR10

from .distributed import barrier
from .errors import DataError, UsageError
from .folders import ImageIndex, SplitLoader, split_index
from .preemption import ignore_stop_signals

log = logging.getLogger(__name__)
MAX_REPLACEMENTS = 16  # unreadable training images in a row before the run stops
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's limit (89 million pixels, 2^28 / 3 bytes)


class ImageFolderWithRecovery(Dataset):
    """The images of a pgt.folders.ImageIndex (torchvision ImageFolder's files, order and labels, held as arrays
    that forked workers share without copying), surviving unreadable files.

    An image is unreadable when PIL cannot decode it, or when it has more pixels than ``max_pixels`` (a
    decompression bomb: a small file that decodes to gigabytes). Training (``replace=True``) logs the path and
    returns the next readable sample instead, trying at most MAX_REPLACEMENTS in a row: more means the data are
    going away under the run (a directory renamed, a filesystem unmounted), which stops it with one line, as does a
    root folder that is gone. Validation (``replace=False``) returns a zero image with target -1 so that the
    evaluation counts it and leaves it out. ``strict=True`` raises DataError naming the file.

    ``unreadable_count()`` is the number of distinct images found unreadable since ``reset_unreadable()``, over all
    worker processes: one byte per image in shared memory, so that an image met as its own sample and again as a
    neighbour's replacement counts once.
    """

    def __init__(self, index: ImageIndex, transform, replace: bool, strict: bool, image_size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.index, self.root, self.classes = index, index.root, index.classes
        self.class_to_idx = {name: label for label, name in enumerate(index.classes)}
        self.transform = transform
        self.replace, self.strict, self.image_size, self.max_pixels = replace, strict, image_size, max_pixels
        self._unreadable = torch.zeros(len(index), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.index)

    def unreadable_count(self) -> int:
        return int(self._unreadable.sum())

    def reset_unreadable(self) -> None:
        self._unreadable.zero_()

    def _load(self, i: int):
        path, target = self.index.path(i), int(self.index.labels[i])
        try:
            with Image.open(path) as image:
                if image.width * image.height > self.max_pixels:
                    raise DataError(f'cannot read image {path}: {image.width}x{image.height} pixels, over '
                                    f'--max-image-pixels {self.max_pixels} (a decompression bomb?)')
                image.load()  # decoded while the file is open; convert() would copy an RGB image
                image = image if image.mode == 'RGB' else image.convert('RGB')
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise DataError(f'cannot read image {path}: {" ".join(str(error).split())}') from None
        return (self.transform(image) if self.transform else image), target

    def __getitem__(self, i: int):
        last = None
        for attempt in range(min(MAX_REPLACEMENTS, len(self))):
            candidate = (i + attempt) % len(self)
            try:
                return self._load(candidate)
            except DataError as error:
                if self.strict:
                    raise
                if not os.path.isdir(self.root):
                    raise DataError(f'{self.root}: the data folder is gone ({error})') from None
                self._unreadable[candidate] = 1
                log.warning('%s; %s', error, 'using the next image' if self.replace else 'left out of the metrics')
                if not self.replace:
                    return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), -1
                last = error
        raise DataError(f'{self.root}: {MAX_REPLACEMENTS} images in a row are unreadable, the last: {last}; are the '
                        f'data still where the run started?')


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
    With ``batch_choices`` (a TrainSizes) each index becomes (index, its batch's size choice), for timm's
    ScheduledTransformDataset; with ``seed_samples`` each key then becomes (key, per-sample seed) for SeededSamples.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 pad: bool = True, batch_size: int = 1, seed_samples: bool = False, batch_choices=None):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.pad, self.batch_size = shuffle, seed, pad, batch_size
        self.seed_samples, self.batch_choices = seed_samples, batch_choices
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
        return order[self.rank::self.world_size]

    def __iter__(self):
        indices = self._indices()
        keys = indices
        if self.batch_choices is not None:
            choices = self.batch_choices(self.epoch)  # one per full batch; the last, partial one is dropped
            keys = [(i, choices[min(n // self.batch_size, len(choices) - 1)]) for n, i in enumerate(indices)]
        if self.seed_samples:
            base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
            keys = [(key, (base + i) % 2 ** 63) for key, i in zip(keys, indices)]
        return iter(keys[self.skip:])

    def __len__(self):
        per_rank = math.ceil(self.size / self.world_size) if self.pad else len(range(self.rank, self.size,
                                                                                       self.world_size))
        return max(per_rank - self.skip, 0)


class TrainSizes:
    """timm's scheduled training resolutions (``--train-img-sizes``, timm.data.ScheduledBatchSampler): the size each
    training batch of an epoch is cropped to, as an index into ``sizes``.

    ``constant`` draws every batch's size from the weights (--train-size-probs); ``progressive`` moves the draw from
    the first size to the last over --epochs: at epoch e its centre is at choice e / (epochs - 1) x (n - 1), spread
    by --train-size-schedule-spread choices, with --train-size-random-mix of uniform draws. With spread 0 and mix 0
    each epoch trains at the one size nearest the centre (FFCV's progressive resizing, in steps).

    timm's sampler draws one choice per batch of its own; here it is run over the batch numbers (batches of one) so
    that it hands the choice of each of ShardedSampler's batches, which stay resumable at any batch. The draws depend
    only on (seed, epoch): every rank and every restart crops a batch to the same size.
    """

    def __init__(self, args, batches: int):
        self.sizes = list(args.train_img_sizes)
        progressive = args.train_size_schedule == 'progressive'
        self._schedule = ScheduledBatchSampler(
            range(max(batches, 1)), batch_sizes=[1] * len(self.sizes), choice_weights=args.train_size_probs,
            seed=args.seed, drop_last=True, choice_schedule=args.train_size_schedule,
            schedule_epochs=args.epochs if progressive else None, schedule_spread=args.train_size_schedule_spread,
            schedule_random_mix=args.train_size_random_mix)

    def __call__(self, epoch: int) -> list[int]:
        """The size choice of each batch of ``epoch``, in batch order."""
        self._schedule.set_epoch(epoch)
        return [batch[0][1] for batch in self._schedule]

    def describe(self, epoch: int) -> str:
        """'160 px' or '160 px x 30 batches, 192 px x 10 batches': what ``epoch`` trains at."""
        counts = Counter(self.sizes[choice] for choice in self(epoch))
        if len(counts) == 1:
            return f'{next(iter(counts))} px'
        return ', '.join(f'{size} px x {count} batches' for size, count in sorted(counts.items()))


def build_transform(args, training: bool, size: int | None = None):
    """timm's ImageNet transforms with every setting explicit (the paper recipes differ from timm's defaults),
    ending in a uint8 CHW tensor: normalisation happens on the device (``use_prefetcher``, as timm's loader).
    ``size``: the training crop (default --img-size)."""
    if training:
        return create_transform(size or args.img_size, is_training=True, scale=tuple(args.scale),
                                ratio=tuple(args.ratio), hflip=args.hflip, color_jitter=args.color_jitter or None,
                                interpolation=args.train_interpolation, use_prefetcher=True)
    return create_transform(args.val_img_size or args.img_size, is_training=False, interpolation=args.interpolation,
                            crop_pct=args.crop_pct, use_prefetcher=True)


def build_dataset(args, split: str, index: ImageIndex | None = None) -> ImageFolderWithRecovery:
    """The split's dataset over ``index`` (pgt.loaders shares one scan among the ranks and restarts), or over a
    scan of its own."""
    training = split == 'train'
    index = split_index(args, split, index)
    return ImageFolderWithRecovery(index, build_transform(args, training), replace=training, strict=args.strict_data,
                                   image_size=args.img_size if training else args.val_img_size or args.img_size,
                                   max_pixels=getattr(args, 'max_image_pixels', DEFAULT_MAX_PIXELS))


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


def _loader_options(args, device: torch.device) -> dict:
    # The loader's own generator: its worker seeds must not draw from (and so shift) the training RNG stream.
    return dict(num_workers=args.workers, pin_memory=device.type == 'cuda', persistent_workers=args.workers > 0,
                generator=torch.Generator().manual_seed(args.seed), worker_init_fn=ignore_stop_signals,
                collate_fn=fast_collate, timeout=getattr(args, 'loader_timeout', 300) if args.workers > 0 else 0)


def _split_dataset(args, split: str, rank: int, index: ImageIndex | None):
    if getattr(args, 'dataset', None) == 'cifar10':
        return build_cifar_dataset(args, split, rank)
    return build_dataset(args, split, index)


def _counting(dataset):
    """The dataset if it counts the unreadable images it met (ImageNet folders), else None (CIFAR's arrays)."""
    return dataset if isinstance(dataset, ImageFolderWithRecovery) else None


def _split_loader(loader: DataLoader, dataset, sizes: TrainSizes | None = None) -> SplitLoader:
    folder = _counting(dataset)
    return SplitLoader(loader, list(dataset.classes), len(dataset), folder.index if folder is not None else None,
                       folder, sizes)


def torch_val_loader(args, rank: int, world_size: int, device: torch.device, split: str = 'val',
                     index: ImageIndex | None = None) -> SplitLoader:
    """The evaluation loader, every image once over the ranks."""
    dataset = _split_dataset(args, split, rank, index)
    loader = DataLoader(dataset, batch_size=args.batch_size, **_loader_options(args, device),
                        sampler=ShardedSampler(len(dataset), rank, world_size, shuffle=False, pad=False))
    return _split_loader(loader, dataset)


def torch_train_loader(args, rank: int, world_size: int, device: torch.device,
                       index: ImageIndex | None = None) -> SplitLoader:
    """The training loader, resumable at any batch; with --train-img-sizes, each batch at its scheduled size."""
    dataset = _split_dataset(args, 'train', rank, index)
    sampler = ShardedSampler(len(dataset), rank, world_size, shuffle=True, seed=args.seed, pad=True,
                             batch_size=args.batch_size, seed_samples=True)
    samples, sizes = dataset, None
    if getattr(args, 'train_img_sizes', None):
        sizes = sampler.batch_choices = TrainSizes(args, len(sampler) // args.batch_size)
        dataset.transform = None  # the crop is the scheduled transform's, chosen per sample key
        samples = ScheduledTransformDataset(dataset, [build_transform(args, True, size) for size in sizes.sizes])
    loader = DataLoader(SeededSamples(samples), batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        **_loader_options(args, device))
    return _split_loader(loader, dataset, sizes)
