import csv
import hashlib
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pgt import PowerGradCrossEntropy
from pgt.preemption import STOP_SIGNALS

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU: on a machine without one they are skipped, saying so."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU (torch.cuda.is_available() is False here)')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


def run_script(script: str, *args, env=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """Run one of the project's command-line programs as a user would, from the repository root."""
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{script} exited {result.returncode}\n{result.stderr[-3000:]}')
    return result


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> Path:
    """The generated tiny ImageNet used by the end-to-end tests: 10 classes, 32 train and 8 val images each."""
    out = tmp_path_factory.mktemp('data') / 'tiny'
    run_script('scripts/make_tiny_imagenet.py', '--synthetic', '--out', out, '--classes', 10,
               '--train-per-class', 32, '--val-per-class', 8, '--image-size', 40, check=True)
    return out


@pytest.fixture(scope='session')
def paper_pair(tiny_data, tmp_path_factory):
    """Two short real runs named after a Table 1 pair: the smoke recipe at alpha 1 and at alpha 0.3."""
    runs = tmp_path_factory.mktemp('paper-runs')
    for name, alpha in (('resnet18-cosine-baseline', '1.0'), ('resnet18-cosine-pgt', '0.3')):
        train_in_process('--config', ROOT / 'configs' / 'smoke.yaml', '--data-dir', tiny_data, '--output',
                         runs / name, '--epochs', 2, '--cooldown-epochs', 0, '--pgt-alpha', alpha,
                         '--pgt-start-epoch', 0, '--workers', 0)
    return runs


# ---- running training as a cluster does: subprocesses in their own session, killed and resumed

SMOKE = ROOT / 'configs' / 'smoke.yaml'
# 10 steps per epoch on the tiny set; a recovery checkpoint every 3 steps; one log line per step (no terminal).
BASE = ['--config', SMOKE, '--epochs', 2, '--cooldown-epochs', 0, '--recovery-interval', 3, '--log-interval', 1]
TIMING_COLUMNS = ('train_img_per_sec',)


def torchrun_command(*args, ranks: int = 2, max_restarts: int = 0) -> list[str]:
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', str(ranks),
            '--max-restarts', str(max_restarts), str(ROOT / 'train.py'), *map(str, args)]


def start_training(*args, command=None, env=None) -> subprocess.Popen:
    """train.py (or ``command``) in a new session, as a batch system starts it, so that a test can signal its whole
    process group; stderr is a pipe to read the log from. The thread count is left as the reference runs have it:
    CPU convolutions are not bitwise the same with another number of threads (torchrun sets one per rank itself)."""
    return subprocess.Popen(command or [sys.executable, str(ROOT / 'train.py'), *map(str, args)], cwd=ROOT,
                            text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})})


def read_until(process, pattern, timeout=180) -> list[str]:
    """Read the run's stderr line by line until ``pattern`` matches; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f'{pattern!r} not seen; output:\n{"".join(lines)[-3000:]}')


def model_state(path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def train_in_process(*args) -> int:
    """train.py's main in this process (no interpreter start-up: the suite's subprocess runs cost ~5 s of imports
    each), with the process's signal handlers restored afterwards."""
    from pgt import train
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        return train.main([str(a) for a in args])
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


STEP_LINE = r'epoch (\d+) step (\d+)/\d+:'  # the interval line of pgt.runlog


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].double(), b[name].double(), atol=tol, rtol=0), name


def summary_values(run_dir) -> list[dict]:
    """summary.csv as read by a user (csv module), without the timing columns, which no two runs share."""
    with open(Path(run_dir) / 'summary.csv', newline='') as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def user_namespaces_work() -> bool:
    """Whether ``unshare -Urm`` works here: a private tmpfs (full or read-only) for a test, without root's powers
    outside it."""
    return shutil.which('unshare') is not None and subprocess.run(
        ['unshare', '-Urm', 'true'], capture_output=True).returncode == 0


def one_line_error(result_stderr: str) -> str:
    """The run's last stderr line, asserting it is the one-line error of pgt.errors.run_cli."""
    assert 'Traceback' not in result_stderr, result_stderr[-3000:]
    last = result_stderr.strip().splitlines()[-1]
    assert last.startswith(('error: ', 'stopped: ')), result_stderr[-3000:]
    return last


def file_digests(run_dir) -> dict[str, str]:
    """sha256 of every file under ``run_dir`` (relative path -> digest)."""
    run_dir = Path(run_dir)
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob('*')) if p.is_file()}


@pytest.fixture(scope='session')
def straight_run(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted single-process run that the interrupted ones must reproduce."""
    run_dir = tmp_path_factory.mktemp('straight') / 'run'
    run_script('train.py', *BASE, '--data-dir', tiny_data, '--output', run_dir, check=True)
    return run_dir


@pytest.fixture(scope='session')
def straight_run_2_ranks(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run (torchrun, gloo) that interrupted 2-rank runs must reproduce."""
    run_dir = tmp_path_factory.mktemp('straight2') / 'run'
    result = subprocess.run(torchrun_command(*BASE, '--data-dir', tiny_data, '--output', run_dir,
                                             '--global-batch-size', 32, '--workers', 0),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def poisoned_loss(monkeypatch):
    """Make the training loss NaN at the given (1-based) training steps."""
    steps, calls = set(), [0]
    original = PowerGradCrossEntropy.forward

    def forward(self, logits, target):
        calls[0] += 1
        loss = original(self, logits, target)
        return loss * float('nan') if calls[0] in steps else loss

    monkeypatch.setattr(PowerGradCrossEntropy, 'forward', forward)
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    yield steps
    for s, handler in handlers.items():
        signal.signal(s, handler)
