#!/usr/bin/env bash
# First run on a fresh machine: .venv with torch, the requirements and this package (scripts/env.sh, which stops with
# one line if the environment is broken), a generated tiny ImageNet in data/tiny, the smoke recipe (ResNet-18 with
# PGT) trained into runs/smoke-<time>/, and the validation of its best checkpoint. README's manual commands are these.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" requirements.txt
[ -d data/tiny ] || .venv/bin/python scripts/make_tiny_imagenet.py --synthetic --out data/tiny
run=runs/smoke-$(date +%Y%m%d-%H%M%S)
.venv/bin/python train.py --config configs/smoke.yaml --data-dir data/tiny --output "$run"
.venv/bin/python validate.py --checkpoint "$run/best.pth" --data-dir data/tiny
.venv/bin/python scripts/report.py --runs "$run" --out "$run/report" >/dev/null
echo "run directory: $run (its report: $run/report/report.md; tensorboard --logdir $run/tb)"
echo "activate the environment with: source .venv/bin/activate"
