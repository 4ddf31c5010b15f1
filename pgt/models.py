"""Models: timm's registry, plus the papers' ResNet-18 without batch normalisation registered into it.

Importing this module registers ``resnet18_nobn``, so ``timm.create_model('resnet18_nobn')`` works anywhere after
``import pgt.models``.
"""
from __future__ import annotations

import difflib

import timm
import torch.nn as nn
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet

from .errors import UsageError


@register_model
def resnet18_nobn(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 without normalisation (Table 2), built as the published code built it: timm's ResNet-18 with
    ``norm_layer=nn.Identity``.

    Two consequences of that construction, kept on purpose to match the published runs: every convolution stays
    without a bias (timm builds them with ``bias=False`` because a norm layer would follow), and timm's zero-init of
    the last norm in each block (``zero_init_last``) finds no weight and does nothing, so each residual branch starts
    at its full He-initialised scale.
    """
    if pretrained:
        raise UsageError('resnet18_nobn has no pretrained weights')
    for key in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):  # timm's factory passes these along
        kwargs.pop(key, None)
    kwargs.setdefault('norm_layer', nn.Identity)
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def check_model_name(name: str) -> None:
    """An unknown name is a readable error that suggests close names from timm's registry."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f'; close names: {", ".join(close)}' if close else ''
        raise UsageError(f'unknown model {name!r} (not in timm\'s registry){hint}')


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    check_model_name(name)
    return timm.create_model(name, num_classes=num_classes, **kwargs)


def load_model_state(model: nn.Module, state: dict, path, name: str, num_classes: int) -> None:
    """load_state_dict with a one-line error: the first mismatch that torch lists, not its whole report."""
    try:
        model.load_state_dict(state['model'])
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UsageError(f'{path} does not fit a {name} with {num_classes} classes ({detail[:160]})') from None
