#!/usr/bin/env bash
# The whole test suite, on a CPU: installs the requirements (runtime, DALI, tests) and the package into .venv, then
# runs pytest. On a GPU node, `bash scripts/test.sh -m cuda` runs the CUDA tests (they skip, naming why, on a CPU).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" requirements.txt requirements-dali.txt requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
