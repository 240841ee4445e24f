"""VGG-19 with BatchNorm: Simonyan and Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015, with BatchNorm (Ioffe and Szegedy 2015) after
every conv.

Adapted to small inputs as the common CIFAR implementations do: the 16 conv layers
(64, 64, M, 128, 128, M, 256 x 4, M, 512 x 4, M, 512 x 4, M) are kept, but the ImageNet
classifier (7x7 pool and two 4096-wide fully connected layers, ~120M parameters) is
replaced by a global average pool to 1x1 and one linear layer, so features are 512-wide.
Max pools use ceil_mode, so an 8x8 input shrinks to 1x1 and then stays there instead of
vanishing; for even sides (e.g. 32x32) this equals the usual floor-mode pooling.
On CIFAR-10 (3, 32, 32) this model has 20,040,522 parameters.
"""

from __future__ import annotations

from torch import nn

from lfm.models.base import Classifier, image_shape, init_weights
from lfm.models.registry import MODELS

CFG_19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M")
CFG_19 += (512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def vgg_body(in_channels: int, cfg: tuple[int | str, ...]) -> nn.Sequential:
    """conv3x3-BN-ReLU per number in `cfg`, 2x2 max pool per "M", then global pool and flatten."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))  # (B, c, H, W) -> (B, c, H/2, W/2)
        else:
            assert isinstance(v, int)
            layers += [
                # conv bias kept (redundant before BN) to match torchvision's vgg19_bn layout
                nn.Conv2d(c, v, 3, padding=1),  # (B, c, H, W) -> (B, v, H, W)
                nn.BatchNorm2d(v),
                nn.ReLU(inplace=False),
            ]
            c = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (B, 512, h, w) -> (B, 512)
    return nn.Sequential(*layers)


@MODELS.register("vgg19_bn", "VGG-19 with BatchNorm, global pool and one linear layer (20.0M)")
def vgg19_bn(num_classes: int, input_shape: tuple[int, ...]) -> Classifier:
    """VGG-19-BN for images of any size (features, adaptive pool to 1x1, linear head)."""
    c, _, _ = image_shape(input_shape, "model 'vgg19_bn'")
    model = Classifier(vgg_body(c, CFG_19), 512, num_classes, input_shape)
    init_weights(model)
    return model
