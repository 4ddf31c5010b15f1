"""The suite as a package: `pip install .` into a fresh virtual environment gives `import pgt` and the console
commands outside the checkout."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_pip_install_into_a_fresh_environment_works_outside_the_repository(tmp_path):
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    # The dependencies (torch, timm, ...) come from this environment, through a .pth file, so that the test installs
    # the package alone; build isolation is off for the same reason (this environment's setuptools builds it).
    site = Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / 'outer.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    # A copy of the tracked sources: without build isolation setuptools builds in the source tree (build/, *.egg-info).
    source = tmp_path / 'source'
    tracked = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    install = subprocess.run([python, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--quiet',
                              str(source)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    outside = tmp_path / 'elsewhere'
    outside.mkdir()
    where = subprocess.run([python, '-c', 'import pgt; print(pgt.__file__, pgt.__version__)'], cwd=outside,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site / 'pgt')), where  # the installed copy, not the checkout
    # Each console command's --help, from its entry point, in one process of the new environment (a process per
    # command would pay torch's and timm's imports six times); then the script pip generated for one of them.
    check_all = ('import contextlib, io, sys\n'
                 'from importlib.metadata import entry_points\n'
                 'for ep in sorted(entry_points(group="console_scripts"), key=lambda ep: ep.name):\n'
                 '    if not ep.name.startswith("pgt-"): continue\n'
                 '    out = io.StringIO()\n'
                 '    sys.argv = [ep.name, "--help"]\n'
                 '    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit): ep.load()()\n'
                 '    print(ep.name, "usage:" in out.getvalue())\n')
    result = subprocess.run([python, '-c', check_all], cwd=outside, capture_output=True, text=True)
    assert result.stdout.split() == ['pgt-preflight', 'True', 'pgt-report', 'True', 'pgt-reproduce', 'True',
                                     'pgt-torchrun', 'True', 'pgt-train', 'True', 'pgt-validate', 'True'], \
        result.stderr[-2000:]
    launcher = (venv / 'bin' / 'pgt-train').read_text()  # the generated script runs the entry point with the venv
    assert launcher.startswith(f'#!{python}') and 'from pgt.train import cli' in launcher
