"""ImageNet-layout folders (<split>/<class>/<image>): the checks of a split, the scan that lists its images in
torchvision ImageFolder's order and labels as an ImageIndex, and the comparison of two class lists. Shared by every
input backend, and what they hand pgt.loaders (SplitLoader).

At ImageNet's size a list of (path, label) tuples, as torchvision and timm hold it, costs twice: the scan of 1.28
million files again on every rank and every restart (each ``scandir`` a round trip on a network filesystem), and a
copy in every DataLoader worker, because reading a Python object writes its reference count, so a forked worker
copies every page of the list it touches (about 225 MB per worker for ImageNet's training set). An ImageIndex holds
the same list as four numpy arrays, which forked workers share untouched; it is saved in the run directory and read
again by every restart for as long as the folders it was scanned from have not changed (their modification times,
one ``stat`` each, where a rescan reads every entry).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import UsageError

log = logging.getLogger(__name__)
RACY_NS = 2_000_000_000  # a folder changed this close to its scan may change again within its mtime's resolution


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


@dataclass
class ImageIndex:
    """A split's images, in torchvision ImageFolder's order: image i is ``path(i)``, of class ``labels[i]``."""
    root: str  # the split folder
    classes: list[str]  # class folders, sorted: label k is classes[k]
    paths: np.ndarray  # uint8: the paths relative to root, UTF-8, one after another
    offsets: np.ndarray  # int64 [n + 1]: path i is paths[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int32 [n]
    folders: list[str]  # every folder the scan listed, root first, relative to root (through links, as named)
    mtimes: np.ndarray  # int64 [len(folders)]: their modification times (ns), read before they were listed
    scanned: int  # when the scan began (ns)

    def __len__(self) -> int:
        return len(self.labels)

    def relative_path(self, i: int) -> str:
        return self.paths[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relative_path(i))

    def samples(self) -> list[tuple[str, int]]:
        """The (path, label) list ImageFolder holds, built anew: for small trees and tools, not for workers."""
        return [(self.path(i), int(self.labels[i])) for i in range(len(self))]

    def digest(self) -> str:
        """sha256 of the relative paths, their boundaries and the labels, in order: what a run's checkpoints
        record, so that a resume can tell whether the list changed under the run."""
        digest = hashlib.sha256(self.paths.tobytes())
        digest.update(self.offsets.astype('<i8').tobytes())
        digest.update(self.labels.astype('<i4').tobytes())
        return digest.hexdigest()

    def is_current(self, root: str | os.PathLike) -> bool:
        """Whether a scan of ``root`` now would give this index: the same folder, and each folder it listed
        unchanged since (an entry added, removed or renamed changes its folder's mtime). A folder modified within
        RACY_NS before the scan may have changed again unseen (a coarse mtime): then it is not."""
        if os.fspath(root) != self.root:
            return False
        for folder, mtime in zip(self.folders, self.mtimes.tolist()):
            try:
                now = os.stat(os.path.join(self.root, folder)).st_mtime_ns
            except OSError:
                return False
            if now != mtime or mtime >= self.scanned - RACY_NS:
                return False
        return True

    def save(self) -> bytes:
        """The index as a .npz file's bytes (pgt.checkpoint.write_atomic puts them in place)."""
        buffer = io.BytesIO()
        np.savez(buffer, root=np.array(self.root), classes=np.array(self.classes, dtype=str), paths=self.paths,
                 offsets=self.offsets, labels=self.labels, folders=np.array(self.folders, dtype=str),
                 mtimes=self.mtimes, scanned=np.array(self.scanned))
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImageIndex:
        with np.load(path, allow_pickle=False) as data:
            return cls(str(data['root']), data['classes'].tolist(), data['paths'], data['offsets'], data['labels'],
                       data['folders'].tolist(), data['mtimes'], int(data['scanned']))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _scan_class(split_dir: str, name: str, own_real: str, split_real: str, class_reals: list[str],
                refused: list[str]) -> dict[str, tuple[int, list[str]]]:
    """{folder relative to the split: (its mtime before it was listed, its image file names)} under one class
    folder. One ``stat`` and one ``scandir`` per folder and no ``stat`` of a regular entry (its type comes with the
    directory entry); a symbolic link is resolved, and not followed when it leads into another class or the split
    itself (it would relabel images) or loops."""
    folders, stack, visited = {}, [(name, own_real)], {own_real}
    while stack:
        folder, folder_real = stack.pop()
        path = os.path.join(split_dir, folder)
        files = []
        folders[folder] = (os.stat(path).st_mtime_ns, files)
        for entry in os.scandir(path):
            entry_name = entry.name
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if os.path.exists(real) and not _inside(real, own_real) and (
                        _inside(real, split_real) or any(_inside(real, other) for other in class_reals)):
                    refused.append(f'{entry.path} -> {real} (outside its class folder)')
                    continue
                if entry.is_dir():
                    if real in visited:
                        refused.append(f'{entry.path} -> {real} (a loop)')
                    else:
                        visited.add(real)
                        stack.append((os.path.join(folder, entry_name), real))
                    continue
            elif entry.is_dir(follow_symlinks=False):
                real = os.path.join(folder_real, entry_name)
                visited.add(real)
                stack.append((os.path.join(folder, entry_name), real))
                continue
            if entry_name.lower().endswith(IMG_EXTENSIONS):
                files.append(entry_name)
    return folders


def scan_image_folder(split_dir: str | os.PathLike) -> ImageIndex:
    """The images of an ImageNet-layout split, in torchvision ImageFolder's order and labels, without its two ways
    of mislabelling: ImageFolder follows every symbolic link, so a link inside one class folder that points into
    another class (or into the split itself) silently relabels that class's images, and a link to an ancestor
    folder loops. Here such links are reported with a warning and not followed; links that lead out of the split
    (to a shared store, as dataset managers make them) are followed. Labels are as ImageFolder gives them: class
    folders (links included) sorted by name."""
    split_dir = os.fspath(split_dir)
    scanned = time.time_ns()
    root_mtime = os.stat(split_dir).st_mtime_ns
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    split_real = os.path.realpath(split_dir)
    class_reals = [os.path.realpath(os.path.join(split_dir, name)) for name in classes]
    names, labels, folders, mtimes, refused = [], [], [''], [root_mtime], []
    for label, (name, own_real) in enumerate(zip(classes, class_reals)):
        found = _scan_class(split_dir, name, own_real, split_real, class_reals, refused)
        for folder in sorted(found):
            mtime, files = found[folder]
            folders.append(folder)
            mtimes.append(mtime)
            names += [f'{folder}{os.sep}{file}' for file in sorted(files)]
            labels += [label] * len(files)
    if refused:
        log.warning('%s: %d symbolic link(s) not followed, so that no image is read under another class: %s%s',
                    split_dir, len(refused), '; '.join(refused[:5]), '; ...' if len(refused) > 5 else '')
    encoded = [name.encode() for name in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(name) for name in encoded], out=offsets[1:])
    paths = np.frombuffer(b''.join(encoded), dtype=np.uint8) if encoded else np.zeros(0, dtype=np.uint8)
    return ImageIndex(split_dir, classes, paths, offsets, np.array(labels, dtype=np.int32), folders,
                      np.array(mtimes, dtype=np.int64), scanned)


def check_class_folders(index: ImageIndex, strict: bool) -> None:
    """A class folder without images is a class the model learns with no example (train/) or is never evaluated on
    (val/, whose top-1 then averages over fewer classes than the model has): a warning; with --strict-data an error
    for val/."""
    counts = np.bincount(index.labels, minlength=len(index.classes))
    empty = [name for name, count in zip(index.classes, counts.tolist()) if not count]
    if not empty:
        return
    text = (f'{index.root}: {len(empty)} class folder(s) without images: {", ".join(empty[:5])}'
            f'{", ..." if len(empty) > 5 else ""}')
    if strict and Path(index.root).name == 'val':
        raise UsageError(f'{text} (--strict-data)')
    log.warning(text)


def split_index(args, split: str, index: ImageIndex | None = None) -> ImageIndex:
    """The images of ``split`` as every backend lists and labels them: ``index`` where pgt.loaders has it (read
    back or scanned once per run), else a scan; its class folders checked either way (check_class_folders)."""
    index = index if index is not None else scan_image_folder(check_split(args.data_dir, split))
    check_class_folders(index, getattr(args, 'strict_data', False))
    return index


def check_same_classes(found: list[str], expected: list[str], where: str, expected_from: str) -> None:
    """A model evaluated on class folders other than those it was trained on reports a meaningless top-1: refuse."""
    if found != expected:
        different = sorted(set(found) ^ set(expected))
        example = f'e.g. {", ".join(different[:3])}' if different else 'the same names in another order'
        raise UsageError(f'{where}: class folders differ from those of {expected_from} ({len(found)} vs '
                         f'{len(expected)} classes; {example})')


@dataclass
class SplitLoader:
    """What an input backend hands pgt.loaders for one split."""
    loader: object  # yields (uint8 NCHW images, int64 targets) batches
    classes: list[str]
    images: int  # in the whole split, over all ranks
    index: ImageIndex | None = None  # the images it reads (ImageNet-layout folders)
    counting: object = None  # the torch backend's dataset, which counts unreadable images
    sizes: object = None  # training with --train-img-sizes: the size schedule (pgt.data.TrainSizes)
