#!/usr/bin/env bash
# The whole test suite, on a CPU: installs requirements-dev.txt into .venv, then runs pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
