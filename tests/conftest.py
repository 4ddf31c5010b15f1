import contextlib
import csv
import functools
import gc
import hashlib
import importlib
import importlib.util
import io
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pgt import PowerGradCrossEntropy
from pgt.errors import run_cli
from pgt.preemption import STOP_SIGNALS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / 'configs' / 'smoke.yaml'
TINY = ROOT / 'tests' / 'tiny.yaml'  # the smoke recipe on timm's test_resnet


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


PROGRAMS = {'train.py': 'pgt.train', 'validate.py': 'pgt.validate', 'scripts/report.py': 'pgt.report',
            'scripts/reproduce.py': 'pgt.reproduce', 'scripts/preflight.py': 'pgt.preflight'}


@functools.cache
def script_module(path: str):
    """A program of scripts/ imported as a module (they are files, not a package), to call its main in-process."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, so that progress bars draw on it as on a user's screen."""

    def isatty(self):
        return True


def run_main(program: str, *args, env=None, check=False, terminal=False) -> subprocess.CompletedProcess:
    """``program``'s main run in this process as its command runs it (pgt.errors.run_cli: the exit code, one error
    line on stderr), without the ~4 s of interpreter start-up and imports that a subprocess pays. For what needs no
    process of its own: refusals, resumes, validation. Signals, kills and launchers still run the real program
    (run_script, start_training). Signal handlers and the environment are restored afterwards."""
    module = importlib.import_module(PROGRAMS[program]) if program in PROGRAMS else script_module(program)
    stdout, stderr, code = io.StringIO(), Terminal() if terminal else io.StringIO(), None
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    saved_env = dict(os.environ)
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run_cli(module.main, [str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        gc.collect()
    result = subprocess.CompletedProcess([program, *map(str, args)], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f'{program} exited {code}\n{result.stderr[-3000:]}')
    return result


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> Path:
    """The generated tiny ImageNet used by the end-to-end tests: 10 classes, 32 train and 8 val images each."""
    out = tmp_path_factory.mktemp('data') / 'tiny'
    with contextlib.redirect_stdout(io.StringIO()):
        script_module('scripts/make_tiny_imagenet.py').main(
            ['--synthetic', '--out', str(out), '--classes', '10', '--train-per-class', '32', '--val-per-class', '8',
             '--image-size', '40'])
    age_folders(out)
    return out


def age_folders(root: Path, seconds: float = 3600) -> None:
    """Date every folder under ``root`` an hour back, as a data set is that was written before the run: the index a
    run saves is reused only for folders unchanged for longer than their mtime's resolution (pgt.folders.RACY_NS)."""
    then = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (then, then))


PAPER_PAIR = {'resnet18-cosine-baseline': 1.0, 'resnet18-cosine-pgt': 0.3}  # a Table 1 row pair: row -> alpha
# Diagnostics of the seed-0 runs: every 3 steps, a quarter of each layer's gradient coordinates masked, the filter
# norms of weight layers 11 and 15 (test_resnet has 16).
DIAGNOSTICS = ['--diagnostics', '--diagnostics-interval', 3, '--diagnostics-mask', 0.25, '--diagnostics-layers', 11,
               15]


@pytest.fixture(scope='session')
def paper_runs(tiny_data, tmp_path_factory) -> Path:
    """Real runs of a Table 1 pair laid out as pgt-report reads them (<row>/seed<k>/): the tiny recipe for 2 epochs,
    PGT from epoch 0 at the row's alpha, seeds 0 (diagnostics on) and 1."""
    runs = tmp_path_factory.mktemp('paper-runs')
    for row, alpha in PAPER_PAIR.items():
        for seed in (0, 1):
            train_in_process('--config', TINY, '--data-dir', tiny_data, '--output', runs / row / f'seed{seed}',
                             '--epochs', 2, '--cooldown-epochs', 0, '--pgt-alpha', alpha, '--pgt-start-epoch', 0,
                             '--seed', seed, '--log-interval', 100, *(DIAGNOSTICS if seed == 0 else []))
    return runs


# ---- running training as a cluster does: subprocesses in their own session, killed and resumed

# 10 steps per epoch on the tiny set; a recovery checkpoint every 3 steps; one log line per step (no terminal).
BASE = ['--config', TINY, '--epochs', 2, '--cooldown-epochs', 0, '--recovery-interval', 3, '--log-interval', 1]
TIMING_COLUMNS = ('train_img_per_sec',)


def torchrun_command(*args, ranks: int = 2, max_restarts: int = 0) -> list[str]:
    """train.py under torchrun, as the docs and the SLURM scripts start it: through pgt.launch."""
    return [sys.executable, '-m', 'pgt.launch', '--standalone', '--nproc-per-node', str(ranks),
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


STEP_LINE = r'epoch (\d+)/\d+ step (\d+)/\d+:'  # the interval line of pgt.runlog


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
    """sha256 of every file under ``run_dir`` (relative path -> digest), but the lock file a job leaves (pgt.runlock:
    its claim on the directory, rewritten by every job that takes it)."""
    run_dir = Path(run_dir)
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob('*')) if p.is_file() and p.name != '.lock'}


@pytest.fixture(scope='session')
def straight_run(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted single-process run that the interrupted ones must reproduce."""
    run_dir = tmp_path_factory.mktemp('straight') / 'run'
    train_in_process(*BASE, '--data-dir', tiny_data, '--output', run_dir)
    return run_dir


@pytest.fixture(scope='session')
def first_epoch_run(tiny_data, tmp_path_factory) -> Path:
    """The straight run's first job: epoch 0 done (last.pth, best.pth, recovery.pth written), then the job ended as
    if its time slot had (--stop-after-epoch 0). Copy it (copy_run) before continuing or damaging it."""
    run_dir = tmp_path_factory.mktemp('first-epoch') / 'run'
    train_in_process(*BASE, '--data-dir', tiny_data, '--output', run_dir, '--stop-after-epoch', 0)
    return run_dir


def copy_run(source: Path, run_dir: Path) -> Path:
    """A copy of a session run for one test to continue or damage (hard links, as the suite writes them, are kept
    apart: each copied file is its own)."""
    shutil.copytree(source, run_dir)
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


def loader_args(data_dir, **overrides) -> SimpleNamespace:
    """The data settings of the smoke recipe at batch 8, seed 3, in this process (--workers 0): what pgt.loaders
    needs to build a run's loaders without a run."""
    base = dict(data_dir=str(data_dir), data_backend='torch', dataset='imagefolder', batch_size=8, workers=0, seed=3,
                img_size=32, val_img_size=32, crop_pct=0.875, interpolation='bilinear', train_interpolation='bilinear',
                scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, color_jitter=0.0, strict_data=False,
                channels_last=False, mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD))
    return SimpleNamespace(**{**base, **overrides})


def lr_curve(args) -> list[float]:
    """The rate each epoch of a configuration trains at, set as train.py sets it (pgt.optim.set_epoch_rate)."""
    from pgt.optim import build_scheduler, set_epoch_rate, total_epochs
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler, _ = build_scheduler(optimizer, args, updates_per_epoch=1)
    curve = []
    for epoch in range(total_epochs(args)):
        set_epoch_rate(scheduler, epoch, args)
        curve.append(optimizer.param_groups[0]['lr'])
    return curve
