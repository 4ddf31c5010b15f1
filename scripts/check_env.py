#!/usr/bin/env python3
"""Check that this Python environment runs the suite: torch and torchvision import and work together, timm imports,
and the versions are those requirements.txt admits. A broken environment is one line on stderr saying what to do,
and exit code 2; a working one is one line on stdout with the versions.

    python scripts/check_env.py          # everything (scripts/env.sh runs it last)
    python scripts/check_env.py --pair   # torch and torchvision alone, before the rest is installed

A torchvision built for another torch, or for another build of the same torch (CPU or CUDA), imports and then fails
at its first operator ("operator torchvision::nms does not exist"), so the check calls one. It imports nothing of
this package: it must speak where ``import pgt`` would end in a traceback.
"""
from __future__ import annotations

import platform
import sys
from importlib import metadata

REPAIR = ('install them as one pair: .venv/bin/python -m pip install --force-reinstall -r requirements-torch.txt '
          '(or, on a cluster, the pair your CUDA needs, in one command)')
SUPPORTED = {'torch': ((2, 11), (2, 15)), 'timm': ((1, 0), (1, 0))}  # (oldest, newest) major.minor


def fail(message: str) -> None:
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


def reason(error: BaseException) -> str:
    return ' '.join(str(error).split())[:160] or type(error).__name__


def installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return 'none'


def minor(version: str) -> tuple[int, int]:
    major, minor_, *_ = (version.split('+')[0] + '.0').split('.')
    return int(major), int(minor_)


def check_pair():
    try:
        import torch
    except Exception as error:
        fail(f'torch does not import ({reason(error)}); {REPAIR}')
    try:
        import torchvision
        from torchvision.ops import nms
        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception as error:
        fail(f'torchvision {installed("torchvision")} does not work with torch {torch.__version__} ({reason(error)}); '
             f'{REPAIR}')
    return torch, torchvision


def check_versions() -> list[str]:
    """Where torch or timm lie outside the releases this version was tested with: one note each."""
    notes = []
    for name, (oldest, newest) in SUPPORTED.items():
        version = installed(name)
        if not oldest <= minor(version) <= newest:
            notes.append(f'{name} {version} is outside the {oldest[0]}.{oldest[1]}-{newest[0]}.{newest[1]} this '
                         f'suite is tested with')
    return notes


def main(argv: list[str]) -> int:
    torch, torchvision = check_pair()
    if '--pair' in argv:
        return 0
    try:
        import timm  # noqa: F401
    except Exception as error:
        fail(f'timm does not import ({reason(error)}); .venv/bin/python -m pip install -r requirements.txt')
    device = f'CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)' if torch.cuda.is_available() else 'CPU'
    print(f'environment: Python {platform.python_version()}, torch {torch.__version__} ({device}), torchvision '
          f'{torchvision.__version__}, timm {installed("timm")}')
    for note in check_versions():
        print(f'warning: {note}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
