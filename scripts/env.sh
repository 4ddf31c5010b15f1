# Sourced by first_run.sh and test.sh: a virtual environment in .venv (made once) with a working torch and
# torchvision pair, the requirements files given as arguments, and this package, editable, so that `import pgt` and
# the pgt-* commands work from anywhere. Each stage is checked (scripts/check_env.py); a broken environment stops here
# with one line that says what to do. pip's output goes to .venv/pip.log; only its errors are shown.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv || { echo "error: $PYTHON -m venv .venv failed (Debian and Ubuntu: apt install python3-venv)" >&2; exit 2; }
fi
PIP_LOG=.venv/pip.log

pip_install() {  # quiet; on failure pip's last error lines, and a non-zero status
    if ! .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off "$@" >>"$PIP_LOG" 2>&1; then
        grep -E '^ERROR' "$PIP_LOG" | tail -n 3 >&2
        return 1
    fi
}

stop() {
    echo "error: $* (pip's output: .venv/pip.log)" >&2
    exit 2
}

# Installs run once per content of the requirements files and pyproject.toml; a later run only checks.
stamp=".venv/installed-$(cat "$@" pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    # torch and torchvision as one pair in one pip command (requirements-torch.txt, the pair CI tests): pip given
    # them apart can pair any torch with a torchvision built for another, which fails only at its first operator.
    # Without an NVIDIA GPU the CPU build comes first (the CUDA build is gigabytes of libraries that cannot run
    # there); where PyTorch's CPU index is out of reach, the same pair from the default index. A torch already in
    # .venv is the user's choice: it is checked, never replaced.
    if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
        echo "env: installing torch and torchvision (requirements-torch.txt) into .venv; this takes a few minutes" >&2
        if command -v nvidia-smi >/dev/null 2>&1 || ! pip_install --timeout 20 --retries 1 \
                --index-url https://download.pytorch.org/whl/cpu -r requirements-torch.txt 2>/dev/null; then
            pip_install -r requirements-torch.txt || stop "could not install torch and torchvision"
        fi
    fi
    .venv/bin/python scripts/check_env.py --pair  # a broken pair stops here, before anything else is installed
    for requirements in "$@"; do
        pip_install -r "$requirements" || stop "could not install $requirements"
    done
    pip_install --no-deps -e . || stop "could not install this package (pip install -e .)"
    touch "$stamp"
fi
.venv/bin/python scripts/check_env.py
