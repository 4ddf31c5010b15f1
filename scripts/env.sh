# Sourced by first_run.sh and test.sh: make .venv (once) and install the requirements files given as arguments.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
for requirements in "$@"; do
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
done
