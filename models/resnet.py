"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", section 4.2).

Depth 6n + 2: a 3x3 conv with 16 filters, three stages of n basic blocks with 16, 32 and 64
channels (the 2nd and 3rd stage halve the map), global average pooling and a linear layer.
Shortcuts are "option A": identity, or stride-2 subsampling plus zero channels when the shape
changes, so the shortcuts add no parameters (ResNet-32: 464,154 parameters at 10 classes).
"""
import torch.nn.functional as F
from torch import nn

from .layers import check_cnn_args, kaiming_init


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by the stride and append zero channels (no parameters)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.stride = stride
        # Pad the new channels on both sides, as in the original Torch code.
        extra = out_channels - in_channels
        self.pad_front, self.pad_back = extra // 2, extra - extra // 2

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection, ReLU after the sum."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 16/32/64-channel stages of n basic blocks each."""

    widths = (16, 32, 64)

    def __init__(self, blocks_per_stage, *, num_classes, in_chans):
        super().__init__()
        layers = [nn.Conv2d(in_chans, self.widths[0], 3, 1, 1, bias=False),
                  nn.BatchNorm2d(self.widths[0]), nn.ReLU(inplace=True)]
        in_channels = self.widths[0]
        for stage, width in enumerate(self.widths):
            for index in range(blocks_per_stage):
                # The first block of stages 2 and 3 halves the map and doubles the channels.
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x):
        features = self.features(x)
        return self.fc(features.mean(dim=(2, 3)))


# Two stride-2 stages: below 4 px the last stage would only see padding.
_MIN_SIZE = 4


def _cifar_resnet(model_name, depth, num_classes, img_size, in_chans, drop_path_rate):
    check_cnn_args(model_name, img_size=img_size, in_chans=in_chans, min_size=_MIN_SIZE,
                   drop_path_rate=drop_path_rate)
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, in_chans=in_chans)


def resnet20(*, num_classes, img_size, in_chans, drop_path_rate=0.0):
    """CIFAR ResNet-20 (n = 3, 0.27 M parameters at 10 classes)."""
    return _cifar_resnet("resnet20", 20, num_classes, img_size, in_chans, drop_path_rate)


def resnet32(*, num_classes, img_size, in_chans, drop_path_rate=0.0):
    """CIFAR ResNet-32 (n = 5, 0.46 M parameters at 10 classes)."""
    return _cifar_resnet("resnet32", 32, num_classes, img_size, in_chans, drop_path_rate)


def resnet44(*, num_classes, img_size, in_chans, drop_path_rate=0.0):
    """CIFAR ResNet-44 (n = 7, 0.66 M parameters at 10 classes)."""
    return _cifar_resnet("resnet44", 44, num_classes, img_size, in_chans, drop_path_rate)


def resnet56(*, num_classes, img_size, in_chans, drop_path_rate=0.0):
    """CIFAR ResNet-56 (n = 9, 0.85 M parameters at 10 classes)."""
    return _cifar_resnet("resnet56", 56, num_classes, img_size, in_chans, drop_path_rate)


def resnet110(*, num_classes, img_size, in_chans, drop_path_rate=0.0):
    """CIFAR ResNet-110 (n = 18, 1.7 M parameters at 10 classes)."""
    return _cifar_resnet("resnet110", 110, num_classes, img_size, in_chans, drop_path_rate)


def resnet1202(*, num_classes, img_size, in_chans, drop_path_rate=0.0):
    """CIFAR ResNet-1202 (n = 200, 19.4 M parameters at 10 classes)."""
    return _cifar_resnet("resnet1202", 1202, num_classes, img_size, in_chans, drop_path_rate)
