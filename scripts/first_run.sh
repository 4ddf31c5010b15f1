#!/usr/bin/env bash
# First run on a fresh machine: virtual environment, a generated tiny ImageNet, the smoke training with PGT
# (a couple of minutes on a laptop CPU), then validation of its best checkpoint.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" requirements.txt
[ -d data/tiny-synthetic ] || .venv/bin/python scripts/make_tiny_imagenet.py --synthetic --out data/tiny-synthetic
run=runs/smoke-$(date +%Y%m%d-%H%M%S)
.venv/bin/python train.py --config configs/smoke.yaml --data-dir data/tiny-synthetic --output "$run"
.venv/bin/python validate.py --checkpoint "$run/best.pth" --data-dir data/tiny-synthetic
echo "run directory: $run (tensorboard --logdir $run/tb)"
