"""Models: timm's registry, plus the papers' two models that timm lacks, registered into it.

Importing this module registers ``resnet18_nobn`` (Table 2; also under the published code's name ``resnet18_wobn``)
and ``resnet20_cifar`` (the ICLR version's CIFAR-10 grid), so ``timm.create_model(name)`` builds them anywhere after
``import pgt.models``, with default pretrained configurations that give timm's ``resolve_data_config`` the data
settings the published code used for them.
"""
from __future__ import annotations

import difflib

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, register_model_deprecations
from timm.models.resnet import BasicBlock, ResNet

from .errors import UsageError

# The published fork's cfgs for these models: its _cfg() default (224 px, crop 0.875, bilinear, ImageNet mean and
# std) for 'resnet18_wobn', the same for its CIFAR ResNets, which it fed 32 px images normalised with ImageNet's
# statistics (timm/models/resnet.py and timm/data/ext_dataloaders.py of skalien/power-grad-transform).
default_cfgs = generate_default_cfgs({
    'resnet18_nobn.untrained': {'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
                                'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
                                'first_conv': 'conv1', 'classifier': 'fc', 'num_classes': 1000},
    'resnet20_cifar.untrained': {'input_size': (3, 32, 32), 'pool_size': (8, 8), 'crop_pct': 1.0,
                                 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN,
                                 'std': IMAGENET_DEFAULT_STD, 'first_conv': 'conv1', 'classifier': 'fc',
                                 'num_classes': 10},
})


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
    kwargs.setdefault('norm_layer', nn.Identity)
    return build_model_with_cfg(ResNet, 'resnet18_nobn', pretrained, block=BasicBlock, layers=[2, 2, 2, 2], **kwargs)


class CifarBasicBlock(nn.Module):
    """He et al. (2016), Sec. 4.2: two 3x3 conv-BN layers; where the width doubles and the map halves, the shortcut is
    the identity subsampled by 2 with zero-padded extra channels ("option A", no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes if stride != 1 or in_planes != planes else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.pad:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The classic CIFAR ResNet-6n+2 (He et al. 2016, Sec. 4.2): a 3x3 stem of 16 channels, three stages of n blocks
    with 16, 32 and 64 channels on 32, 16 and 8 px maps, global average pooling and a linear classifier. Weights
    initialised as the published fork's CifarResNet did: Kaiming normal (fan-in) for convolutions and the classifier,
    batch norm at weight 1, bias 0. timm's interface: ``forward_features``, ``forward_head``, ``get_classifier``."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10, in_chans: int = 3, **kwargs):
        super().__init__()
        if kwargs:
            raise TypeError(f'unexpected arguments for CifarResNet: {", ".join(sorted(kwargs))}')
        self.num_classes, self.num_features = num_classes, 64
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [CifarBasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                      for i in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for 32 px CIFAR images (n = 3; 0.27 M parameters with 10 classes), the ICLR version's Fig. 2(c)."""
    if pretrained:
        raise UsageError('resnet20_cifar has no pretrained weights')
    return build_model_with_cfg(CifarResNet, 'resnet20_cifar', pretrained, blocks_per_stage=3, **kwargs)


register_model_deprecations(__name__, {'resnet18_wobn': 'resnet18_nobn'})  # the published code's name


def check_model_name(name: str) -> None:
    """An unknown name is a readable error that suggests close names from timm's registry."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f'; close names: {", ".join(close)}' if close else ''
        raise UsageError(f'unknown model {name!r} (not in timm\'s registry){hint}')


def pretrained_data_config(name: str) -> dict:
    """The model's default pretrained configuration (input size, crop, interpolation, mean, std), for timm's
    resolve_data_config; {} for a model without one."""
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """timm.create_model; an argument the model does not take (from --model-kwargs) is one line naming it."""
    check_model_name(name)
    try:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise UsageError(f'--model-kwargs: {name} cannot be built with {kwargs}: {error}') from None


def load_model_state(model: nn.Module, state_dict: dict, path, name: str, num_classes: int) -> None:
    """load_state_dict with a one-line error: the first mismatch that torch lists, not its whole report."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UsageError(f'{path} does not fit a {name} with {num_classes} classes ({detail[:160]})') from None
