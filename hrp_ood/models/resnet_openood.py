"""OpenOOD v1.5's `ResNet18_32x32` (openood/networks/resnet18_32x32.py), rebuilt on our contract.

State-dict keys and shapes are OpenOOD's exactly (conv1, bn1, layer1..layer4 of BasicBlocks with
conv1/bn1/conv2/bn2/shortcut.0/shortcut.1, fc), so OpenOOD's class loads `export_state_dict(net)` strictly and
we load OpenOOD checkpoints. Forward, feature list ([stem, layer1, layer2, layer3, pooled layer4]) and ReAct
clipping follow OpenOOD's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hrp_ood.models.base import ClassifierNet, register_model


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ClassifierNet):
    """The CIFAR ResNet trunk both ResNets share: 3×3 stem conv-bn-relu without max-pool, four stages of
    `block`s (64-128-256-512), global average pooling, 512-d feature, linear head `fc`."""

    def __init__(
        self, block: type[nn.Module], num_blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        in_planes = 64
        for index, (planes, depth, stride) in enumerate(zip(widths, num_blocks, strides), start=1):
            blocks = [block(in_planes if k == 0 else planes, planes, stride if k == 0 else 1) for k in range(depth)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_planes = planes
        self.num_features = 512
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        stem = F.relu(self.bn1(self.conv1(x)))
        out1 = self.layer1(stem)
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        return [stem, out1, out2, out3, self.layer4(out3)]


class ResNet18_32x32(CifarResNet):  # noqa: N801 (OpenOOD's class name)
    """ResNet-18 for 32×32 images: 3×3 stem without max-pool, four stages of two BasicBlocks, 512-d feature."""

    def __init__(self, num_classes: int = 10, num_blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__(BasicBlock, num_blocks, num_classes)


@register_model("resnet18_32x32")
def resnet18_32x32(num_classes: int) -> ResNet18_32x32:
    return ResNet18_32x32(num_classes=num_classes)
