"""VGG-19 with BatchNorm for Animal-10N ("VGG-19N" in the noisy-label literature), 64×64 input.

The conv stack is torchvision's `vgg19_bn` layer for layer (configuration "E", state-dict keys `features.<i>.*`,
so torchvision's feature weights load into it); torchvision's 7×7 pooling and 4096-wide MLP classifier are
replaced by global average pooling and one linear layer, giving a 512-d penultimate feature.
"""

from __future__ import annotations

from torch import Tensor, nn

from hrp_ood.models.base import ClassifierNet, register_model

# channels of each 3×3 conv, "M" = 2×2 max-pool (torchvision's configuration "E" = VGG-19)
VGG19_LAYERS: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
    "M",
)


def make_vgg_features(layers: tuple[int | str, ...]) -> nn.Sequential:
    """conv3×3-BN-ReLU per number, max-pool per "M", in torchvision's `make_layers(batch_norm=True)` order."""
    modules: list[nn.Module] = []
    in_channels = 3
    for layer in layers:
        if layer == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            modules += [
                nn.Conv2d(in_channels, int(layer), kernel_size=3, padding=1),
                nn.BatchNorm2d(int(layer)),
                nn.ReLU(inplace=True),
            ]
            in_channels = int(layer)
    return nn.Sequential(*modules)


class VGG(ClassifierNet):
    """VGG conv stack, global average pooling, linear head; a stage ends at each max-pool."""

    def __init__(self, layers: tuple[int | str, ...] = VGG19_LAYERS, num_classes: int = 10) -> None:
        super().__init__()
        self.features = make_vgg_features(layers)
        self.num_features = [layer for layer in layers if layer != "M"][-1]
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's VGG initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        stages = []
        for module in self.features:
            x = module(x)
            if isinstance(module, nn.MaxPool2d):
                stages.append(x)
        return stages


@register_model("vgg19_bn")
def vgg19_bn(num_classes: int) -> VGG:
    return VGG(VGG19_LAYERS, num_classes=num_classes)
