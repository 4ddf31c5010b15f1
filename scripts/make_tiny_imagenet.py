#!/usr/bin/env python3
"""Make a tiny ImageNet-layout tree (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) for first runs and tests.

    # a deterministic subset of a real ImageNet tree (symlinks; --copy to copy the files)
    python scripts/make_tiny_imagenet.py --from /imagenet --out tiny --classes 10 \
        --train-per-class 100 --val-per-class 50
    # generated JPEGs whose classes a small network learns in a minute on a CPU
    python scripts/make_tiny_imagenet.py --synthetic --out tiny
    # the same generated classes at 32 px in CIFAR-10's format (cifar-10-batches-py/), for --dataset cifar10
    python scripts/make_tiny_imagenet.py --synthetic --cifar10 --out tiny-cifar
"""
from __future__ import annotations

import colorsys
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pgt.errors import CliParser, UsageError, run_cli

IMAGE_SUFFIXES = {'.jpeg', '.jpg', '.png'}


def parse_args(argv):
    p = CliParser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--from', dest='source', metavar='IMAGENET_DIR', help='carve a subset of this tree')
    source.add_argument('--synthetic', action='store_true', help='generate images instead')
    p.add_argument('--out', required=True, metavar='DIR')
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--train-per-class', type=int, default=64)
    p.add_argument('--val-per-class', type=int, default=16)
    p.add_argument('--image-size', type=int, default=64, help='synthetic image side in pixels')
    p.add_argument('--cifar10', action='store_true',
                   help="write the synthetic images (32 px) in CIFAR-10's python format instead of folders")
    p.add_argument('--copy', action='store_true', help='copy files instead of symlinking them')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--debug', action='store_true')
    return p.parse_args(argv)


def wnid(index: int) -> str:
    return f'n{index:08d}'


def synthetic_image(label: int, classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Class = a hue and a stripe orientation; each image adds random brightness, phase, offset and noise, so the
    classes survive random-resized crops and flips but a network still has to learn them."""
    hue = label / classes
    r, g, b = colorsys.hsv_to_rgb(hue, 0.8, 0.5 + 0.4 * rng.random())
    angle = np.pi * (label % 4) / 4
    yy, xx = np.mgrid[0:size, 0:size] / size
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    base = np.array([r, g, b]) * (0.6 + 0.4 * stripes)[:, :, None]
    pixels = np.clip(base + rng.normal(0, 0.08, (size, size, 3)), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def make_synthetic(out: Path, classes: int, per_split: dict, size: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    count = 0
    for split, per_class in per_split.items():
        for label in range(classes):
            folder = out / split / wnid(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                synthetic_image(label, classes, size, rng).save(folder / f'{wnid(label)}_{i}.JPEG', quality=90)
                count += 1
    return count


def make_synthetic_cifar10(out: Path, classes: int, per_split: dict, seed: int) -> int:
    """CIFAR-10's python format, as torchvision reads it: pickled dicts with 'data' (uint8 [N, 3072], channel-planar
    32 x 32 images) and 'labels', in five training batches and a test batch, with batches.meta naming the classes."""
    rng = np.random.default_rng(seed)
    folder = out / 'cifar-10-batches-py'
    folder.mkdir(parents=True)

    def batch(per_class):
        labels = [label for label in range(classes) for _ in range(per_class)]
        images = [np.asarray(synthetic_image(label, classes, 32, rng)).transpose(2, 0, 1).reshape(-1)
                  for label in labels]
        return np.stack(images).astype(np.uint8), labels

    data, labels = batch(per_split['train'])
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        with open(folder / f'data_batch_{i + 1}', 'wb') as f:
            pickle.dump({'data': data[part], 'labels': [labels[j] for j in part]}, f)
    test_data, test_labels = batch(per_split['val'])
    with open(folder / 'test_batch', 'wb') as f:
        pickle.dump({'data': test_data, 'labels': test_labels}, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [wnid(label) for label in range(classes)]}, f)
    return len(labels) + len(test_labels)


def carve_subset(source: Path, out: Path, classes: int, per_split: dict, copy: bool, seed: int) -> int:
    train = source / 'train'
    if not train.is_dir() or not (source / 'val').is_dir():
        raise UsageError(f'{source}: expected train/<wnid>/ and val/<wnid>/ folders')
    all_classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    if classes > len(all_classes):
        raise UsageError(f'{source}: asked for {classes} classes, the tree has {len(all_classes)}')
    chosen = sorted(random.Random(seed).sample(all_classes, classes))
    count = 0
    for split, per_class in per_split.items():
        for name in chosen:
            folder = source / split / name
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
            if len(files) < per_class:
                raise UsageError(f'{folder}: {len(files)} images, fewer than the {per_class} asked for')
            target = out / split / name
            target.mkdir(parents=True, exist_ok=True)
            for f in random.Random(f'{seed}-{split}-{name}').sample(files, per_class):
                if copy:
                    shutil.copy2(f, target / f.name)
                else:
                    os.symlink(f.resolve(), target / f.name)
                count += 1
    return count


def main(argv) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f'{out} exists and is not empty; choose another --out')
    per_split = {'train': args.train_per_class, 'val': args.val_per_class}
    if args.cifar10 and not args.synthetic:
        raise UsageError('--cifar10 writes generated images: give --synthetic with it')
    if args.cifar10:
        count = make_synthetic_cifar10(out, args.classes, per_split, args.seed)
    elif args.synthetic:
        count = make_synthetic(out, args.classes, per_split, args.image_size, args.seed)
    else:
        count = carve_subset(Path(args.source), out, args.classes, per_split, args.copy, args.seed)
    print(f'wrote {count} images in {args.classes} classes to {out}')
    return 0


if __name__ == '__main__':
    run_cli(main)
