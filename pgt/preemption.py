"""Preemption: SIGTERM, SIGUSR1 (what SLURM and torchrun send before they kill or requeue a job) and SIGINT ask the
run to stop.

Schedulers signal a whole process group: SLURM every process of the job step, torchrun's agent the process group of
each rank, and a terminal's Ctrl-C its foreground group. DataLoader workers are in that group, and a worker that dies
of the signal takes the run down before it can save. So workers ignore these signals (``ignore_stop_signals`` is
the loaders' ``worker_init_fn``) and only the main process of each rank handles them; workers end when their rank
does.

During start-up (data scan, model building) a signal stops the process at once with exit code 75: nothing has been
trained, so nothing is lost. Once training runs (``training_started``), the handler only sets a flag; the training
loop checks it after every step, agrees on it across ranks, writes a recovery checkpoint and exits with code 75
(pgt.errors.Preempted), so no step is half done and at most one step is lost. A second SIGINT stops at once.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from .errors import StoppedDuringStartUp

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: the rank's main process handles the signals that the worker also receives.
    (torch's worker handler re-raises a SIGTERM that its parent did not send, which kills the worker.)"""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionFlag:
    def __init__(self):
        self.signal_name = None
        self.training = False

    def install(self) -> PreemptionFlag:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def training_started(self) -> None:
        """From here on a signal only sets the flag; a signal that came before was already acted on."""
        self.training = True

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.training:
            raise StoppedDuringStartUp(f'{name} during start-up, before training began: nothing to save; start the '
                                       f'run again (with --resume auto if it had checkpoints)')
        if self.signal_name == 'SIGINT' and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the recovery checkpoint
        self.signal_name = name

    def requested(self) -> bool:
        """True on every rank as soon as any rank got a signal. The flag is a CPU tensor: the default group reduces
        it with gloo (pgt.distributed), so agreeing on it costs no GPU synchronisation."""
        flag = torch.tensor([1 if self.signal_name else 0])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag)
        return bool(flag.item())
