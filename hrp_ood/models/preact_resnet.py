"""PreAct ResNet-18 as DivideMix uses it (PreResNet.py of LiJunnan1992/DivideMix), the paper's backbone.

CIFAR variant: 3×3 stem conv-bn-relu, no max-pool, four stages of two pre-activation blocks (64-128-256-512),
global average pooling, 512-d feature. Layer names are DivideMix's except its `linear` head, named `fc` here
(the network contract).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hrp_ood.models.base import register_model
from hrp_ood.models.resnet_openood import CifarResNet


class PreActBlock(nn.Module):
    """Pre-activation block (He et al., 2016): a = relu(bn1(x)); out = conv2(relu(bn2(conv1(a)))) + shortcut(a).

    As in DivideMix, the shortcut (identity or 1×1 conv) takes the pre-activated input a, not x.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + self.shortcut(activated)


class PreActResNet(CifarResNet):
    """Stem, four stages of pre-activation blocks, global average pooling, linear head."""

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10) -> None:
        super().__init__(PreActBlock, num_blocks, num_classes)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes)
