#!/usr/bin/env python3
"""Prepare ILSVRC2012 (ImageNet-1k) for training: sort the raw validation folder into class folders, then check the
tree against ImageNet-1k's counts and report missing or unreadable files.

    python scripts/prepare_imagenet.py --data-dir /imagenet --devkit ILSVRC2012_devkit_t12.tar.gz
    python scripts/prepare_imagenet.py --data-dir /imagenet --kaggle-csv LOC_val_solution.csv   # Kaggle's copy
    python scripts/prepare_imagenet.py --data-dir /imagenet --check                             # counts only

The official download unpacks the 50,000 validation images into one folder (ILSVRC2012_val_00000001.JPEG, ...);
their classes are in the devkit (data/ILSVRC2012_validation_ground_truth.txt: an ILSVRC2012_ID per image, in file
order; data/meta.mat: the synsets, whose 1,000 leaves map those IDs to WordNet IDs). Kaggle's distribution gives them
as LOC_val_solution.csv (ImageId, PredictionString whose first word is the WordNet ID). Either way each image is
moved (a rename: nothing is copied) into val/<wnid>/, the layout of train/ and of torchvision's ImageFolder. Sorting
again is harmless: images already in class folders are left where they are. Exit code 1 when a file is missing or
unreadable or the counts are not ImageNet-1k's; 2 on bad input.
"""
from __future__ import annotations

import csv
import io
import re
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from pgt.errors import CliParser, UsageError, run_cli

IMAGENET = {'classes': 1000, 'train': 1_281_167, 'val': 50_000}
VAL_NAME = re.compile(r'ILSVRC2012_val_(\d{8})\.JPEG$', re.I)
IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


def parse_args(argv):
    p = CliParser(description=__doc__)
    p.add_argument('--data-dir', required=True, help='the tree with train/<wnid>/ and the raw val/')
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument('--devkit', help='ILSVRC2012_devkit_t12.tar.gz, or the folder it unpacks to')
    labels.add_argument('--kaggle-csv', help="Kaggle's LOC_val_solution.csv")
    labels.add_argument('--check', action='store_true', help='only count and check, sort nothing')
    p.add_argument('--dry-run', action='store_true',
                   help='say what would move, move nothing, and check the tree as the sort would leave it')
    p.add_argument('--threads', type=int, default=16, help='decoding threads for the readability check')
    p.add_argument('--debug', action='store_true')
    return p.parse_args(argv)


def _devkit_member(devkit: Path, name: str) -> bytes:
    """data/<name> from the devkit archive or folder."""
    if devkit.is_dir():
        path = devkit / 'data' / name
        if not path.is_file():
            raise UsageError(f'{devkit}: no data/{name} (expected the unpacked ILSVRC2012_devkit_t12)')
        return path.read_bytes()
    try:
        with tarfile.open(devkit) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith(f'data/{name}')), None)
            if member is None:
                raise UsageError(f'{devkit}: no data/{name} inside (expected ILSVRC2012_devkit_t12.tar.gz)')
            return archive.extractfile(member).read()
    except (tarfile.TarError, OSError) as error:
        raise UsageError(f'cannot read the devkit {devkit}: {error}') from None


def devkit_labels(devkit: str) -> dict[int, str]:
    """{image number (1-based): WordNet ID} from the devkit: the ground truth's ILSVRC2012_IDs through meta.mat's
    1,000 leaf synsets (num_children == 0)."""
    from scipy.io import loadmat
    devkit = Path(devkit)
    if not devkit.exists():
        raise UsageError(f'devkit not found: {devkit}')
    synsets = loadmat(io.BytesIO(_devkit_member(devkit, 'meta.mat')), squeeze_me=True)['synsets']
    wnid_of = {int(s['ILSVRC2012_ID']): str(s['WNID']) for s in synsets if int(s['num_children']) == 0}
    truth = _devkit_member(devkit, 'ILSVRC2012_validation_ground_truth.txt').decode().split()
    try:
        return {number: wnid_of[int(class_id)] for number, class_id in enumerate(truth, start=1)}
    except (KeyError, ValueError) as error:
        raise UsageError(f'{devkit}: the ground truth names class {error}, which meta.mat does not have') from None


def kaggle_labels(path: str) -> dict[int, str]:
    """{image number: WordNet ID} from LOC_val_solution.csv (ImageId like ILSVRC2012_val_00000001)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'Kaggle CSV not found: {path}')
    labels = {}
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {'ImageId', 'PredictionString'} <= set(reader.fieldnames):
            raise UsageError(f'{path}: expected the columns ImageId and PredictionString (LOC_val_solution.csv)')
        for row in reader:
            number = re.search(r'(\d{8})$', row['ImageId'])
            if number and row['PredictionString'].split():
                labels[int(number.group(1))] = row['PredictionString'].split()[0]
    return labels


def sort_validation(val_dir: Path, labels: dict[int, str], dry_run: bool) -> dict:
    """Move every val/ILSVRC2012_val_*.JPEG at the top of val/ into val/<wnid>/. Returns what happened: moved,
    already sorted, missing (labelled but absent) and unlabelled (present, not in the labels) files, and the
    sorted tree ({wnid: [image]}: as it is afterwards, or as it would be on a dry run, each file named where it
    lies now)."""
    loose = {int(m.group(1)): path for path in val_dir.iterdir()
             if path.is_file() and (m := VAL_NAME.search(path.name))}
    sorted_already = {int(m.group(1)) for path in val_dir.glob('*/*') if (m := VAL_NAME.search(path.name))}
    tree = images_by_class(val_dir)
    moved = 0
    for number, path in sorted(loose.items()):
        if number not in labels:
            continue
        target = val_dir / labels[number] / path.name
        if not dry_run:
            target.parent.mkdir(exist_ok=True)
            path.rename(target)
        tree.setdefault(labels[number], []).append(path if dry_run else target)  # where the file is now
        moved += 1
    missing = sorted(set(labels) - set(loose) - sorted_already)
    unlabelled = sorted(set(loose) - set(labels))
    return {'moved': moved, 'already': len(sorted_already), 'missing': missing, 'unlabelled': unlabelled,
            'tree': tree}


def images_by_class(split_dir: Path) -> dict[str, list[Path]]:
    if not split_dir.is_dir():
        return {}
    return {d.name: [f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
            for d in sorted(split_dir.iterdir()) if d.is_dir()}


def unreadable(files: list[Path], threads: int) -> list[tuple[Path, str]]:
    """The files PIL cannot decode, with the reason (threads: PIL releases the GIL while decoding)."""
    def problem(path):
        try:
            with Image.open(path) as image:
                image.convert('RGB')
        except Exception as error:
            return path, ' '.join(str(error).split())
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [p for p in pool.map(problem, files) if p is not None]


def check_tree(data_dir: Path, threads: int, val: dict[str, list[Path]] | None = None) -> list[str]:
    """Counts of train/ and val/ (or of ``val``, the validation tree a dry run would make) against ImageNet-1k's,
    and the unreadable validation images: the problems found (and a line of counts printed)."""
    train = images_by_class(data_dir / 'train')
    val = images_by_class(data_dir / 'val') if val is None else val
    counts = {'classes': len(train), 'train': sum(map(len, train.values())), 'val': sum(map(len, val.values()))}
    print(f'train: {counts["classes"]} classes, {counts["train"]:,} images; val: {len(val)} classes, '
          f'{counts["val"]:,} images')
    problems = [f'{key}: {counts[key]:,}, ImageNet-1k has {IMAGENET[key]:,}' for key in IMAGENET
                if counts[key] != IMAGENET[key]]
    if set(val) != set(train):
        problems.append(f'val/ and train/ have different class folders ({len(set(val) ^ set(train))} differ)')
    for path, reason in unreadable([f for files in val.values() for f in files], threads):
        problems.append(f'unreadable: {path}: {reason}')
    return problems


def main(argv) -> int:
    args = parse_args(argv)
    data_dir = Path(args.data_dir)
    val_dir = data_dir / 'val'
    if not val_dir.is_dir():
        raise UsageError(f'{data_dir}: no val/ folder')
    problems = []
    if not args.check:
        labels = devkit_labels(args.devkit) if args.devkit else kaggle_labels(args.kaggle_csv)
        result = sort_validation(val_dir, labels, args.dry_run)
        verb = 'would move' if args.dry_run else 'moved'
        print(f'{verb} {result["moved"]:,} validation images into class folders ({result["already"]:,} were '
              f'already sorted)')
        problems += [f'missing: {val_dir}/ILSVRC2012_val_{n:08d}.JPEG is in the labels but not in val/'
                     for n in result['missing']]
        problems += [f'unlabelled: ILSVRC2012_val_{n:08d}.JPEG has no label; left in val/'
                     for n in result['unlabelled']]
        problems += check_tree(data_dir, args.threads, result['tree'])
    else:
        problems += check_tree(data_dir, args.threads)
    for line in problems[:50]:
        print(line)
    if len(problems) > 50:
        print(f'... and {len(problems) - 50} more')
    print('ok: ImageNet-1k as expected' if not problems else f'{len(problems)} problem(s)')
    sys.stdout.flush()
    return 1 if problems else 0


if __name__ == '__main__':
    run_cli(main)
