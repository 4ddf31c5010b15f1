"""The first command on a fresh machine: scripts/env.sh (which first_run.sh and test.sh source) installs torch and
torchvision as one pair, and scripts/check_env.py stops a broken environment with one line before anything runs.
The whole first run into an empty environment is CI's first step: .ci/run runs scripts/first_run.sh in a fresh clone
named pgt, then the test suite there."""
import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import ROOT, script_module


def test_this_environment_passes_the_check():
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert script_module('scripts/check_env.py').main([]) == 0
    line = out.getvalue().strip()
    assert line.startswith(f'environment: Python {sys.version.split()[0]}, torch {torch.__version__} (')
    assert f'torchvision {torchvision.__version__}, timm ' in line


def fresh_clone(folder: Path) -> Path:
    """The tracked files of this checkout, as a clone holds them."""
    tracked = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)
    return folder


@pytest.mark.slow
def test_first_run_stops_with_one_line_on_a_torchvision_built_for_another_torch(tmp_path):
    """A .venv whose torch is this environment's and whose torchvision is the release for the torch before it: it
    imports, then fails at its first operator. first_run.sh must stop there, with one line saying what to do, and
    train nothing."""
    clone = fresh_clone(tmp_path / 'pgt')
    subprocess.run([sys.executable, '-m', 'venv', str(clone / '.venv')], check=True)
    python = clone / '.venv' / 'bin' / 'python'
    site = Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    outer = subprocess.run([sys.executable, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                           capture_output=True, text=True, check=True).stdout.strip()
    (site / 'outer.pth').write_text(outer + '\n')  # torch from this environment: "already installed" in .venv
    major, minor = map(int, torch.__version__.split('.')[:2])
    other = f'torchvision==0.{minor + 14}.0'  # torchvision 0.(m+15) goes with torch 2.m: this one is one release off
    install = subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--no-deps', other], capture_output=True,
                             text=True, timeout=300)
    if install.returncode != 0:
        pytest.skip(f'{other} cannot be installed here (no index or wheel offers it), so no mismatched pair can be '
                    f'made: {install.stderr.strip().splitlines()[-1:]}')
    result = subprocess.run(['bash', 'scripts/first_run.sh'], cwd=clone, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: torchvision 0.{minor + 14}.0 does not work with torch {torch.__version__} ('), last
    assert last.endswith('install them as one pair: .venv/bin/python -m pip install --force-reinstall -r '
                         'requirements-torch.txt (or, on a cluster, the pair your CUDA needs, in one command)')
    assert not (clone / 'runs').exists() and not (clone / 'data').exists()
