"""The suite as a package: `pip install .` into a fresh virtual environment gives `import pgt` and the console
commands outside the checkout."""
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT


def test_pip_install_into_a_fresh_environment_works_outside_the_repository(tmp_path):
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    # The dependencies (torch, timm, ...) come from this environment, through a .pth file, so that the test installs
    # the package alone; build isolation is off for the same reason (this environment's setuptools builds it).
    site = Path(subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / 'outer.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    install = subprocess.run([python, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--quiet',
                              str(ROOT)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    outside = tmp_path / 'elsewhere'
    outside.mkdir()
    where = subprocess.run([python, '-c', 'import pgt; print(pgt.__file__, pgt.__version__)'], cwd=outside,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site / 'pgt')), where  # the installed copy, not the checkout
    for command in ('pgt-train', 'pgt-validate', 'pgt-reproduce', 'pgt-report', 'pgt-preflight'):
        result = subprocess.run([venv / 'bin' / command, '--help'], cwd=outside, capture_output=True, text=True)
        assert result.returncode == 0 and 'usage:' in result.stdout, (command, result.stderr[-2000:])
    help_text = subprocess.run([venv / 'bin' / 'pgt-train', '--help'], cwd=outside, capture_output=True,
                               text=True).stdout
    assert '--pgt-alpha' in help_text and '-c FILE.yaml, --config FILE.yaml' in help_text
