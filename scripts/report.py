#!/usr/bin/env python3
"""The papers' tables and figures from this suite's runs (the program is pgt/report.py, installed as
``pgt-report``)."""
from pgt.report import cli

if __name__ == '__main__':
    cli()
