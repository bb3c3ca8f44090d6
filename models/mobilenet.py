"""MobileNet V1 (Howard et al. 2017) and MobileNet V2 (Sandler et al. 2018).

At img_size >= 128 both use the ImageNet layout (first conv stride 2, total stride 32;
V1 has 4.23 M and V2 3.50 M parameters at 1000 classes). Smaller inputs get the usual CIFAR
adaptation, which keeps a spatial map at 32 px: the first conv has stride 1 (V1: total stride 16,
2x2 map at 32 px) and V2 also keeps stride 1 in its 24-channel stage (total stride 8, 4x4 map).
The parameter count does not depend on the layout. Both end in global average pooling,
optional dropout (`drop_rate`, off by default; V2's reference ImageNet head uses 0.2) and a
linear layer.
"""
from torch import nn

from .layers import IMAGENET_STEM_MIN_SIZE, check_cnn_args, conv_bn_act, kaiming_init


class ClassifierHead(nn.Module):
    """Global average pool, dropout, linear."""

    def __init__(self, in_features, num_classes, drop_rate):
        super().__init__()
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features):
        return self.fc(self.dropout(features.mean(dim=(2, 3))))


# MobileNet V1 body after the 32-channel stem, Table 1 of the paper: (output channels, stride)
# of each depthwise-separable layer.
V1_LAYERS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
             (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """MobileNet V1 (width 1.0): a 3x3 conv stem then 13 depthwise-separable layers."""

    def __init__(self, *, num_classes, in_chans, imagenet_stem, drop_rate):
        super().__init__()
        layers = [conv_bn_act(in_chans, 32, 3, 2 if imagenet_stem else 1, nn.ReLU)]
        in_channels = 32
        for out_channels, stride in V1_LAYERS:
            layers.append(conv_bn_act(in_channels, in_channels, 3, stride, nn.ReLU,
                                      groups=in_channels))  # depthwise
            layers.append(conv_bn_act(in_channels, out_channels, 1, 1, nn.ReLU))  # pointwise
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(in_channels, num_classes, drop_rate)
        kaiming_init(self)

    def forward(self, x):
        return self.head(self.features(x))


class InvertedResidual(nn.Module):
    """1x1 expand + ReLU6, depthwise 3x3 + ReLU6, linear 1x1 project; residual when shapes match."""

    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        layers = []
        if expansion != 1:  # with t = 1 the paper (and torchvision) have no expansion conv
            layers.append(conv_bn_act(in_channels, hidden, 1, 1, nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, nn.ReLU6, groups=hidden),
            # No activation after the projection: the paper's "linear bottleneck".
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


# MobileNet V2 body, Table 2 of the paper: (expansion t, output channels c, repeats n, stride s).
V2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNet V2 (width 1.0): 3x3 conv stem, 17 inverted residuals, 1x1 conv to 1280."""

    def __init__(self, *, num_classes, in_chans, imagenet_stem, drop_rate):
        super().__init__()
        layers = [conv_bn_act(in_chans, 32, 3, 2 if imagenet_stem else 1, nn.ReLU6)]
        in_channels = 32
        for stage, (expansion, out_channels, repeats, stride) in enumerate(V2_STAGES):
            if stage == 1 and not imagenet_stem:
                stride = 1  # CIFAR adaptation: drop one more early downsampling
            for index in range(repeats):
                layers.append(InvertedResidual(in_channels, out_channels,
                                               stride if index == 0 else 1, expansion))
                in_channels = out_channels
        layers.append(conv_bn_act(in_channels, 1280, 1, 1, nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(1280, num_classes, drop_rate)
        kaiming_init(self)

    def forward(self, x):
        return self.head(self.features(x))


def _mobilenet(model_class, model_name, cifar_min_size, num_classes, img_size, in_chans,
               drop_rate, drop_path_rate, imagenet_stem=None):
    # cifar_min_size is the CIFAR layout's total stride: smaller inputs leave the last
    # stride-2 layers reading only padding.
    check_cnn_args(model_name, img_size=img_size, in_chans=in_chans, min_size=cifar_min_size,
                   drop_path_rate=drop_path_rate, drop_rate=drop_rate)
    if imagenet_stem is None:
        imagenet_stem = img_size >= IMAGENET_STEM_MIN_SIZE
    return model_class(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, imagenet_stem=imagenet_stem)


def mobilenet_v1(*, num_classes, img_size, in_chans, drop_rate=0.0, drop_path_rate=0.0):
    """MobileNet V1, CIFAR stem below 128 px, ImageNet stem from 128 px."""
    return _mobilenet(MobileNetV1, "mobilenet_v1", 16, num_classes, img_size, in_chans,
                      drop_rate, drop_path_rate)


def authors_mobilenet(*, num_classes, img_size, in_chans, drop_rate=0.0, drop_path_rate=0.0):
    """The competitive-distillation authors' `mobilenet`: MobileNet V1 with the stride-1 stem at every
    input size (total stride 16: a 14x14 map at 224 px, where mobilenet_v1 has 7x7)."""
    return _mobilenet(MobileNetV1, "mobilenet", 16, num_classes, img_size, in_chans, drop_rate, drop_path_rate,
                      imagenet_stem=False)


def mobilenet_v2(*, num_classes, img_size, in_chans, drop_rate=0.0, drop_path_rate=0.0):
    """MobileNet V2, CIFAR stem below 128 px, ImageNet stem from 128 px."""
    return _mobilenet(MobileNetV2, "mobilenet_v2", 8, num_classes, img_size, in_chans,
                      drop_rate, drop_path_rate)
