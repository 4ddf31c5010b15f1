"""Process-group set-up from torchrun's environment, and the few collectives the training loop needs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import RunError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """One process per GPU under torchrun (RANK, WORLD_SIZE, LOCAL_RANK).

    On GPUs the default group has two backends, NCCL for CUDA tensors and gloo for CPU tensors, so that small
    control messages (the preemption flag, every step) travel on the CPU without a GPU synchronisation.
    """
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('cpu:gloo,cuda:nccl' if device.type == 'cuda' else 'gloo',
                                store=_attempt_store(rank, world_size), rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=30),
                                device_id=device if device.type == 'cuda' else None)
    return DistEnv(rank, world_size, local_rank, device)


def _attempt_store(rank: int, world_size: int):
    """torchrun's store with a prefix of its own for each restart attempt (--max-restarts). Without it, ranks of a
    restarted attempt were seen to read the peer addresses of the attempt that crashed and fail to connect."""
    from torch.distributed.rendezvous import rendezvous
    store, _, _ = next(rendezvous('env://', rank, world_size, timeout=timedelta(minutes=30)))
    return dist.PrefixStore(f'pgt/attempt_{os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")}', store)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_object(value, src: int = 0):
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return value


def all_gather_object(value) -> list:
    """Every rank's ``value``, in rank order (``[value]`` on one process)."""
    if dist.is_available() and dist.is_initialized():
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def run_on_main(fn, is_main: bool) -> None:
    """Run ``fn`` on rank 0 only and raise its RunError on every rank, so that no rank goes on into a collective
    that rank 0, stopped by a full disk for example, will never join."""
    error = None
    if is_main:
        try:
            fn()
        except RunError as caught:
            error = caught
    error = broadcast_object(error)
    if error is not None:
        raise error


def computed_on_main(fn, is_main: bool):
    """``fn()`` run on rank 0 alone and its result handed to every rank (a RunError raised on every rank): work
    that every rank needs the same result of, done once (the scan of a data tree). Without a process group each
    caller is on its own and runs ``fn`` itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except RunError as caught:
            error = caught
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
