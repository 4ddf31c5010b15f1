"""Preemption: SIGTERM, SIGUSR1 (what SLURM and torchrun send before they kill or requeue a job) and SIGINT ask the
run to stop.

Schedulers signal a whole process group: SLURM every process of the job step, torchrun's agent the process group of
each rank, and a terminal's Ctrl-C its foreground group. DataLoader workers are in that group, and a worker that dies
of the signal takes the run down before it can save. So workers ignore these signals (``ignore_stop_signals`` is
the loaders' ``worker_init_fn``) and only the main process of each rank handles them; workers end when their rank
does.

During start-up (data scan, model building) a signal stops the process at once with exit code 75: nothing has been
trained, so nothing is lost. Once training runs (``training_started``), the handler only sets a flag; the training
loop checks it after steps, agrees on it across ranks, writes a recovery checkpoint and exits with code 75
(pgt.errors.Preempted), so no step is half done and no trained step is lost. A second SIGINT stops at once.

How often the ranks agree: a single process reads its flag after every step, at no cost. Under DDP agreeing is a CPU
all-reduce (gloo, no GPU synchronisation), about 0.3 ms with two local ranks and more across nodes, so the ranks
agree every ``agree_every`` steps (--signal-check-interval, 10 by default, and never more than --recovery-interval)
and at the last step of each epoch. The exit latency is then at most that many steps: about 1-5 s for ResNet-50 on
ImageNet, against the 300 s that SLURM's ``--signal=B:USR1@300`` leaves before the kill, and always within one
recovery interval, so a signal never costs more than the recovery checkpoints already risk.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from .errors import StoppedDuringStartUp

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _signal_when_orphaned(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: the rank's main process handles the signals that the worker also receives.
    (torch's worker handler re-raises a SIGTERM that its parent did not send, which kills the worker.)"""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionFlag:
    def __init__(self, agree_every: int = 1):
        self.signal_name = None
        self.training = False
        self.agree_every = agree_every

    def install(self) -> PreemptionFlag:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def watch_launcher(self, interval: float = 1.0) -> None:
        """Under torchrun, stop as on SIGTERM when the launcher is gone. torchrun starts each rank in a session of
        its own, so killing the launcher's process group (kill -9 of a job, a node agent dying) leaves the ranks
        running on, writing into the run directory with no one to restart or stop them. A thread notices that the
        rank's parent changed and sends the rank SIGTERM: it saves a recovery checkpoint and exits 75."""
        if 'TORCHELASTIC_RUN_ID' not in os.environ:
            return
        threading.Thread(target=_signal_when_orphaned, args=(os.getppid(), interval), daemon=True,
                         name='pgt-launcher-watch').start()

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

    def requested(self, step: int = 0, steps_in_epoch: int = 0) -> bool:
        """Whether to stop after update ``step`` of the epoch: on one process, as soon as a signal came; under DDP,
        True on every rank at the first agreement step (every ``agree_every`` steps, and the epoch's last) after any
        rank got one, False on every rank in between. The flag is a CPU tensor: the default group reduces it with
        gloo (pgt.distributed), so agreeing on it costs no GPU synchronisation."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signal_name is not None
        if step % self.agree_every and step != steps_in_epoch:
            return False
        flag = torch.tensor([1 if self.signal_name else 0])
        dist.all_reduce(flag)
        return bool(flag.item())
