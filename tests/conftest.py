import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))


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
        run_script('train.py', '--config', ROOT / 'configs' / 'smoke.yaml', '--data-dir', tiny_data,
                   '--output', runs / name, '--epochs', 2, '--cooldown-epochs', 0, '--pgt-alpha', alpha,
                   '--pgt-start-epoch', 0, check=True)
    return runs
