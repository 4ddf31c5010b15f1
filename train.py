#!/usr/bin/env python3
"""Train an ImageNet classifier with timm, optionally with the PowerGrad Transform: the program is pgt/train.py
(installed as ``pgt-train``); this file lets a clone run it as timm's users expect:

    torchrun --nproc-per-node 4 train.py --config configs/paper/resnet50-cosine-pgt.yaml --data-dir /imagenet
"""
from pgt.train import cli

if __name__ == '__main__':
    cli()
