# Sourced by first_run.sh and test.sh: make .venv (once), install the requirements files given as arguments, then
# this package itself, editable, so that `import pgt` and the pgt-* commands work from anywhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
for requirements in "$@"; do
    pip_install -r "$requirements"
done
pip_install --no-deps -e .
