"""ImageNet-layout folders (<split>/<class>/<image>): the checks of a split, the scan that lists its images in
torchvision ImageFolder's order and labels, the digest that identifies such a list, and the comparison of two class
lists. Shared by every input backend, and what they hand pgt.loaders (SplitLoader)."""
from __future__ import annotations

import collections
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import UsageError

log = logging.getLogger(__name__)


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


def check_same_classes(found: list[str], expected: list[str], where: str, expected_from: str) -> None:
    """A model evaluated on class folders other than those it was trained on reports a meaningless top-1: refuse."""
    if found != expected:
        different = sorted(set(found) ^ set(expected))
        example = f'e.g. {", ".join(different[:3])}' if different else 'the same names in another order'
        raise UsageError(f'{where}: class folders differ from those of {expected_from} ({len(found)} vs '
                         f'{len(expected)} classes; {example})')


def check_class_folders(split_dir: str | os.PathLike, classes: list[str], samples: list[tuple[str, int]],
                        strict: bool) -> None:
    """A class folder without images is a class the model learns with no example (train/) or is never evaluated on
    (val/, whose top-1 then averages over fewer classes than the model has): a warning; with --strict-data an error
    for val/."""
    counts = collections.Counter(label for _, label in samples)
    empty = [name for label, name in enumerate(classes) if not counts[label]]
    if not empty:
        return
    text = (f'{split_dir}: {len(empty)} class folder(s) without images: {", ".join(empty[:5])}'
            f'{", ..." if len(empty) > 5 else ""}')
    if strict and Path(split_dir).name == 'val':
        raise UsageError(f'{text} (--strict-data)')
    log.warning(text)


def samples_digest(split_dir: str | os.PathLike, samples: list[tuple[str, int]]) -> str:
    """sha256 of a split's list of images (paths relative to the split folder) and labels, in order: what a run's
    checkpoints record, so that a resume can tell whether the tree changed under the run."""
    digest = hashlib.sha256()
    root = os.fspath(split_dir)
    for path, label in samples:
        digest.update(f'{os.path.relpath(path, root)}\t{label}\n'.encode())
    return digest.hexdigest()


@dataclass
class SplitLoader:
    """What an input backend hands pgt.loaders for one split."""
    loader: object  # yields (uint8 NCHW images, int64 targets) batches
    classes: list[str]
    images: int  # in the whole split, over all ranks
    digest: str | None = None  # samples_digest of the split's list
    counting: object = None  # the torch backend's dataset, which counts unreadable images

