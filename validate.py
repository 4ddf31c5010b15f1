#!/usr/bin/env python3
"""Evaluate a checkpoint (this suite's, timm's, or a timm model's pretrained weights): the program is
pgt/validate.py (installed as ``pgt-validate``); this file lets a clone run it as ``python validate.py ...``.
"""
from pgt.validate import cli

if __name__ == '__main__':
    cli()
