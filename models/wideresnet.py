"""Wide ResNets (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

WRN-d-k: a 3x3 conv with 16 filters, three groups of (d - 4) / 6 pre-activation basic blocks
with 16k, 32k and 64k channels (groups 2 and 3 halve the map), BN-ReLU, global average pooling
and a linear layer. Shape-changing shortcuts are 1x1 convs. Dropout between the two convs of a
block is the paper's optional regulariser (0.3 in its CIFAR runs), off by default here.
WRN-28-10 has 36.5 M parameters at 10 classes.
"""
import torch.nn.functional as F
from torch import nn

from .layers import check_cnn_args, kaiming_init


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-dropout-conv3x3, plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_channels, out_channels, stride, drop_rate):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        # As in the authors' code, a projection shortcut reads the pre-activated input
        # (the identity shortcut keeps the raw x, so the residual stream stays un-normalised).
        shortcut = x if self.projection is None else self.projection(activated)
        out = self.conv1(activated)
        out = F.relu(self.bn2(out))
        out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for small images."""

    def __init__(self, depth, widen_factor, *, num_classes, in_chans, drop_rate):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks_per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers = [nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)]
        in_channels = 16
        for group, width in enumerate(widths):
            for index in range(blocks_per_group):
                stride = 2 if group > 0 and index == 0 else 1
                layers.append(PreActBlock(in_channels, width, stride, drop_rate))
                in_channels = width
        # Pre-activation blocks end on a conv, so the head needs its own BN-ReLU.
        layers += [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x):
        features = self.features(x)
        return self.fc(features.mean(dim=(2, 3)))


# Two stride-2 groups: below 4 px the last group would only see padding.
_MIN_SIZE = 4


def _wide_resnet(model_name, depth, widen_factor, num_classes, img_size, in_chans,
                 drop_rate, drop_path_rate):
    check_cnn_args(model_name, img_size=img_size, in_chans=in_chans, min_size=_MIN_SIZE,
                   drop_path_rate=drop_path_rate, drop_rate=drop_rate)
    return WideResNet(depth, widen_factor, num_classes=num_classes, in_chans=in_chans,
                      drop_rate=drop_rate)


def wrn_16_8(*, num_classes, img_size, in_chans, drop_rate=0.0, drop_path_rate=0.0):
    """WRN-16-8 (11.0 M parameters at 10 classes)."""
    return _wide_resnet("wrn_16_8", 16, 8, num_classes, img_size, in_chans,
                        drop_rate, drop_path_rate)


def wrn_28_10(*, num_classes, img_size, in_chans, drop_rate=0.0, drop_path_rate=0.0):
    """WRN-28-10 (36.5 M parameters at 10 classes)."""
    return _wide_resnet("wrn_28_10", 28, 10, num_classes, img_size, in_chans,
                        drop_rate, drop_path_rate)


def wrn_40_2(*, num_classes, img_size, in_chans, drop_rate=0.0, drop_path_rate=0.0):
    """WRN-40-2 (2.2 M parameters at 10 classes)."""
    return _wide_resnet("wrn_40_2", 40, 2, num_classes, img_size, in_chans,
                        drop_rate, drop_path_rate)
