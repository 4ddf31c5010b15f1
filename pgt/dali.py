"""NVIDIA DALI input pipelines (``--data-backend dali``): JPEG decoding on the GPU (nvJPEG and the hardware decoder,
``--dali-device gpu``) or on the CPU (``--dali-device cpu``; also the only mode on a machine without CUDA).

The same data as the torch backend: labels from torchvision's ImageFolder scan of the same tree (sorted class
folders), so checkpoints move between backends; training random-resized-crop (``--scale``, ``--ratio``), resize to
``--img-size`` with linear interpolation, horizontal flip ``--hflip``; evaluation resize of the shorter side to
val_img_size / crop_pct and a centre crop. The pipelines end in uint8 CHW and the normalisation happens on the
device, as for the torch backend (pgt.loaders.device_loader). Two differences to know: DALI always uses linear
interpolation and no colour jitter (the published pipeline's choices, which the paper recipes also set), and exact
mid-epoch resume is a property of the torch backend only (DALI's reader order is not restartable at a sample).

Order and sharding: DALI's reader reshuffles the whole list every epoch (``shuffle_after_epoch``) with a seed of its
own (a constant plus the epoch; its ``seed`` argument does not reach that shuffle), so the file list is first
permuted with the run's --seed: each epoch's order then depends on --seed, and is the same on every rank. The list is
padded by repeating its first files until it divides by the world size (as the torch backend's sampler does), so
every rank gets a shard of the same length and runs the same number of steps. Validation is neither permuted nor
padded: shards partition the list and the last partial batch is kept, so every image is evaluated exactly once.

The list reaches DALI as a file list (``file_list``, one "path label" line per image, read by DALI itself), written
from the split's ImageIndex: no Python list of 1.28 million strings is built for it (a path with whitespace, which
such a file cannot hold, falls back to DALI's ``files`` argument).
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .errors import DataError, UsageError
from .folders import ImageIndex, SplitLoader, split_index

log = logging.getLogger(__name__)

PREFETCH = 2  # batches the pipeline runs ahead (prefetch_queue_depth)
WHITESPACE = np.frombuffer(b' \t\n\r', dtype=np.uint8)  # bytes a file list's "path label" line cannot hold
SEARCH_LIMIT = 20_000  # files decoded with PIL to name the one DALI stopped on: about a minute on 16 threads
INSTALL_HINT = ('pip install -r requirements-dali.txt (nvidia-dali-cuda130 for CUDA 13, nvidia-dali-cuda120 for '
                'CUDA 12)')


def _import_dali():
    try:
        from nvidia import dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIClassificationIterator, LastBatchPolicy
    except ImportError:
        raise UsageError(f'--data-backend dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT}') from None
    return fn, pipeline_def, types, DALIClassificationIterator, LastBatchPolicy


class FileList:
    """A split's images in the order DALI's reader is given them: ``order`` indexes the split's ImageIndex (the
    training list permuted by --seed and padded; the validation list as it is)."""

    def __init__(self, index: ImageIndex, order: np.ndarray):
        self.index, self.order = index, order

    def __len__(self) -> int:
        return len(self.order)

    def paths(self, start: int, stop: int) -> list[str]:
        return [self.index.path(int(i)) for i in self.order[start:stop]]

    def reader_arguments(self, folder: str) -> dict:
        """fn.readers.file's arguments for this list: a file list written into ``folder``, or, for a path with
        whitespace, the lists themselves."""
        index = self.index
        if np.isin(index.paths, WHITESPACE).any():
            return {'files': self.paths(0, len(self)), 'labels': index.labels[self.order].tolist()}
        path = os.path.join(folder, 'files.txt')
        with open(path, 'w') as f:
            for i in self.order.tolist():
                f.write(f'{index.relative_path(i)} {index.labels[i]}\n')
        return {'file_root': index.root, 'file_list': path}

    def shard(self, rank: int, world_size: int) -> tuple[int, int]:
        """The [start, stop) of DALI's reader shard ``rank`` (contiguous, as its file reader splits the list)."""
        return len(self) * rank // world_size, len(self) * (rank + 1) // world_size


def first_undecodable(files: list[str]) -> tuple[str, str] | None:
    """The first of ``files`` that PIL cannot decode, with the reason. DALI stops the whole pipeline on a file its
    decoder cannot read without naming it, so after such a stop the likely files are decoded again here (threads:
    PIL releases the GIL while decoding) to tell the user which one it was."""
    def problem(path):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as error:
            return ' '.join(str(error).split())
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        for path, reason in zip(files, pool.map(problem, files)):
            if reason is not None:
                return path, reason
    return None


def is_data_error(error: Exception) -> bool:
    """Whether a DALI pipeline stopped on a file: its reader or decoder failed, and not for want of memory (which
    is no fault of the data, and keeps its own message and traceback)."""
    text = str(error)
    return bool(re.search(r'operator `nvidia\.dali\.fn\.(readers|decoders)\.', text)) and 'out of memory' not in text


def decoding_error(error: Exception, candidates: list[str]) -> DataError:
    """One line for a DALI pipeline that stopped on a file: the file (named by DALI, or found with PIL among the
    ``candidates``, the likeliest first and at most SEARCH_LIMIT of them), and what to do."""
    text = str(error)
    dali_reason = re.search(r'encountered:\s*(.+)', text)
    dali_reason = dali_reason.group(1).strip() if dali_reason else ' '.join(text.split())[:200]
    named = next((path for path in candidates if path in text), None)
    if named is not None:
        found = (named, dali_reason)
    else:
        log.warning('DALI stopped (%s); decoding the likely files with PIL to find the culprit', dali_reason)
        found = first_undecodable(candidates[:SEARCH_LIMIT])
    if found is None:
        return DataError(f'DALI could not read an image ({dali_reason}), and PIL decodes the '
                         f'{min(len(candidates), SEARCH_LIMIT)} likeliest files; use --data-backend torch')
    return DataError(f'cannot read image {found[0]}: {found[1]} (DALI: {dali_reason}); remove or replace it, or '
                     f'use --data-backend torch, which replaces unreadable training images')


def training_order(size: int, seed: int, world_size: int) -> np.ndarray:
    """The training list's order: permuted by --seed (see the module docstring), then padded by repeating its start
    until it divides by the world size."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.concatenate([order, order[:math.ceil(size / world_size) * world_size - size]])


def _build_pipeline(training: bool, files: FileList, args, shard_id, num_shards, gpu: bool, device_id):
    fn, pipeline_def, types, _, _ = _import_dali()
    decoder_device = 'mixed' if gpu else 'cpu'
    folder = tempfile.mkdtemp(prefix='pgt-dali-')
    source = files.reader_arguments(folder)

    @pipeline_def
    def pipeline():
        jpegs, label = fn.readers.file(**source, shard_id=shard_id, num_shards=num_shards,
                                       shuffle_after_epoch=training, seed=args.seed, pad_last_batch=True,
                                       name='Reader')
        size = args.img_size if training else getattr(args, 'val_img_size', None) or args.img_size
        if training:
            extra = {'hw_decoder_load': 0.99} if gpu else {}  # the A100/H100 hardware JPEG decoder takes most
            images = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB,
                                                   random_area=list(args.scale), random_aspect_ratio=list(args.ratio),
                                                   num_attempts=10, **extra)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                               antialias=False)
            mirror = fn.random.coin_flip(probability=args.hflip)
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout='CHW', mirror=mirror)
        else:
            images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=math.floor(size / args.crop_pct),
                               interp_type=types.INTERP_LINEAR)
            images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout='CHW', crop=(size, size),
                                              crop_pos_x=0.5, crop_pos_y=0.5)
        return images, label

    threads = max(1, getattr(args, 'workers', 4))
    # exec_dynamic=False: the iterator then copies each output into a tensor torch owns. With the dynamic executor
    # it hands out views of DALI's buffers, which a pipeline that stops on a bad image frees under them (a crash).
    pipe = pipeline(batch_size=args.batch_size, num_threads=threads, device_id=device_id,
                    seed=args.seed * 1000 + shard_id, prefetch_queue_depth=PREFETCH, exec_dynamic=False)
    try:
        pipe.build()  # the reader reads its file list here
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return pipe


class EpochStart:
    """The ``sampler`` of a DaliLoader: where train.py says an epoch starts (``set_epoch(epoch, skip_batches)``).
    Its own object, not the loader itself: a loader that referred to itself would be freed only by the cyclic
    garbage collector, which may tear DALI's iterator and pipeline down in either order (a crash)."""

    def __init__(self):
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.skip = skip_batches


class DaliLoader:
    """A DALI pipeline behind the interface train.py expects of a loader: ``len``, ``sampler.set_epoch`` and
    (uint8 images NCHW, int64 labels) batches. Training yields the same number of full batches on every rank.
    ``files`` and ``shard``, the rank's part of the list in the reader's order, tell where to look when the pipeline
    stops on a file: the batch it was reading (and the ones it prefetched) first. (The reader reshuffles after every
    epoch, so from the second epoch on that is a guess, and the search goes on through the shard.)"""

    def __init__(self, pipe, training: bool, steps: int | None, files: FileList, shard: tuple[int, int],
                 batch_size: int):
        *_, iterator_cls, policy = _import_dali()
        self.files, self.shard, self.batch_size = files, shard, batch_size
        # The iterator runs the pipeline for its first batches already, and a file DALI cannot read there can crash
        # the process inside DALI (a segmentation fault, seen with its CPU decoder) instead of raising: those batches
        # are decoded with PIL first, which names the file.
        found = first_undecodable(self._likely_files(0)[:(PREFETCH + 1) * batch_size])
        if found is not None:
            raise DataError(f'cannot read image {found[0]}: {found[1]}; remove or replace it, or use --data-backend '
                            f'torch, which replaces unreadable training images')
        try:
            self.iterator = iterator_cls(pipe, reader_name='Reader', auto_reset=True,
                                         last_batch_policy=policy.DROP if training else policy.PARTIAL)
        except RuntimeError as error:
            if not is_data_error(error):
                raise
            raise decoding_error(error, self._likely_files(0)) from None
        self.steps = steps if steps is not None else len(self.iterator)
        self.sampler = EpochStart()

    def _likely_files(self, batch: int) -> list[str]:
        """The shard's files from the batch ``batch`` on, then the ones before it: at most SEARCH_LIMIT."""
        first, last = self.shard
        start = min(first + batch * self.batch_size, last)
        after = self.files.paths(start, min(last, start + SEARCH_LIMIT))
        return after + self.files.paths(first, min(start, first + SEARCH_LIMIT - len(after)))

    def __len__(self):
        return self.steps - self.sampler.skip

    def __iter__(self):
        # DALI restarts an epoch only after the last one ended: batches past ``steps``, and those a consumer leaves
        # (taking one probe batch, a benchmark stopping early), are drained rather than left for the next epoch.
        batches = enumerate(self.iterator)
        drain, i = True, 0
        try:
            for i, batch in batches:
                if self.sampler.skip <= i < self.steps:
                    images, labels = batch[0]['data'], batch[0]['label']
                    yield images, labels.squeeze(-1).long()
        except RuntimeError as error:
            if not is_data_error(error):
                raise
            drain = False  # the pipeline is no longer valid
            raise decoding_error(error, self._likely_files(i + 1)) from None
        finally:
            if drain:
                for _ in batches:
                    pass
            self.sampler.skip = 0


def _dali_setup(args, device: torch.device):
    gpu = (args.dali_device or ('gpu' if torch.cuda.is_available() else 'cpu')) == 'gpu'
    if gpu and not torch.cuda.is_available():
        raise UsageError('--dali-device gpu needs CUDA, and none is available; use --dali-device cpu')
    _import_dali()
    return gpu, (device.index if device.type == 'cuda' else None)  # device_id None: DALI's CPU-only mode


def dali_val_loader(args, rank: int, world_size: int, device: torch.device, split: str = 'val',
                    index: ImageIndex | None = None) -> SplitLoader:
    """The evaluation pipeline, every image once over the ranks."""
    gpu, device_id = _dali_setup(args, device)
    index = split_index(args, split, index)
    files = FileList(index, np.arange(len(index)))
    loader = DaliLoader(_build_pipeline(False, files, args, rank, world_size, gpu, device_id), training=False,
                        steps=None, files=files, shard=files.shard(rank, world_size), batch_size=args.batch_size)
    return SplitLoader(loader, index.classes, len(index), index)


def dali_train_loader(args, rank: int, world_size: int, device: torch.device,
                      index: ImageIndex | None = None) -> SplitLoader:
    """The training pipeline, the same number of full batches on every rank."""
    gpu, device_id = _dali_setup(args, device)
    index = split_index(args, 'train', index)
    files = FileList(index, training_order(len(index), args.seed, world_size))
    steps = len(files) // world_size // args.batch_size
    if steps == 0:  # no full batch: pgt.loaders refuses the run, and a pipeline would only be built to be dropped
        return SplitLoader([], index.classes, len(index), index)
    loader = DaliLoader(_build_pipeline(True, files, args, rank, world_size, gpu, device_id), training=True,
                        steps=steps, files=files, shard=files.shard(rank, world_size), batch_size=args.batch_size)
    return SplitLoader(loader, index.classes, len(index), index)
