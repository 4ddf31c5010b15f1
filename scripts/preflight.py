#!/usr/bin/env python3
"""Check a cluster node before spending GPU-days on it (the program is pgt/preflight.py, installed as
``pgt-preflight``)."""
from pgt.preflight import cli

if __name__ == '__main__':
    cli()
