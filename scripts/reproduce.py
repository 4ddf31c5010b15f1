#!/usr/bin/env python3
"""Run the papers' tables from their recipes (the program is pgt/reproduce.py, installed as ``pgt-reproduce``)."""
from pgt.reproduce import cli

if __name__ == '__main__':
    cli()
