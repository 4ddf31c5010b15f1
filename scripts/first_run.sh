#!/usr/bin/env bash
# First run on a fresh machine: virtual environment with the package, a generated tiny ImageNet, the smoke training
# with PGT (a couple of minutes on a laptop CPU), then validation of its best checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Without an NVIDIA GPU, PyPI's default torch (the CUDA build) is gigabytes of libraries that cannot run: take the CPU
# build from PyTorch's own index, or PyPI's torch when that index is out of reach.
if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --timeout 20 --retries 1 \
        --index-url https://download.pytorch.org/whl/cpu torch torchvision \
        || echo "first_run: PyTorch's CPU index is out of reach; torch comes from the default index" >&2
fi
source scripts/env.sh requirements.txt
[ -d data/tiny-synthetic ] || .venv/bin/python scripts/make_tiny_imagenet.py --synthetic --out data/tiny-synthetic
run=runs/smoke-$(date +%Y%m%d-%H%M%S)
.venv/bin/python train.py --config configs/smoke.yaml --data-dir data/tiny-synthetic --output "$run"
.venv/bin/python validate.py --checkpoint "$run/best.pth" --data-dir data/tiny-synthetic
echo "run directory: $run (tensorboard --logdir $run/tb); activate the environment with: source .venv/bin/activate"
