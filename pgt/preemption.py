"""Preemption: SIGTERM and SIGUSR1 (what SLURM sends before it kills or requeues a job) ask the run to stop.

The handler only sets a flag. The training loop checks it after every step, agrees on it across ranks, writes a
recovery checkpoint and exits with code 75 (pgt.errors.Preempted), so no step is half done and at most one step is lost.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.signal_name = None

    def install(self):
        for sig in _SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        """True on every rank as soon as any rank got a signal. The flag is a CPU tensor: the default group reduces
        it with gloo (pgt.distributed), so agreeing on it every step costs no GPU synchronisation."""
        flag = torch.tensor([1 if self.signal_name else 0])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag)
        return bool(flag.item())
