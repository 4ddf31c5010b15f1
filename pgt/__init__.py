"""PowerGrad Transform (PGT) training suite on timm."""
from .transform import (PowerGradCrossEntropy, power_grad_cross_entropy, power_transform, stationary_threshold,
                        target_distribution)

__all__ = ['PowerGradCrossEntropy', 'power_grad_cross_entropy', 'power_transform', 'stationary_threshold',
           'target_distribution']
__version__ = '0.3.0'  # as pyproject.toml
