"""Inception V1 / GoogLeNet (Szegedy et al. 2015, "Going Deeper with Convolutions").

The nine inception modules of Table 1 (with true 5x5 convs) between a stem and a global-pool
linear head. At img_size >= 128 the stem is the paper's ImageNet one (7x7/2 conv, 3x3/2 max-pool,
1x1 conv, 3x3 conv, 3x3/2 max-pool; total stride 32); smaller inputs get the common CIFAR stem, a
single 3x3 conv to 192 channels (total stride 4, 8x8 map at 32 px). Differences from the paper, as
in the usual modern ports: batch norm after every conv instead of local response normalisation,
no auxiliary classifiers (forward returns logits only, in train and eval mode), and dropout before
the linear layer is `drop_rate` (the paper used 0.4), off by default.
"""
import torch
from torch import nn

from .layers import IMAGENET_STEM_MIN_SIZE, check_cnn_args, conv_bn_act, kaiming_init


def max_pool():
    """The paper's 3x3 stride-2 max-pool, padded so it halves any size like a stride-2 conv."""
    # At 224 px this gives the paper's 112 -> 56 -> 28 -> 14 -> 7 (Caffe's ceil mode does too),
    # and unlike ceil mode without padding it also accepts 2x2 and 1x1 maps.
    return nn.MaxPool2d(3, stride=2, padding=1)


class InceptionModule(nn.Module):
    """Four parallel branches (1x1; 1x1->3x3; 1x1->5x5; 3x3 max-pool->1x1) concatenated."""

    def __init__(self, in_channels, ch1x1, ch3x3_reduce, ch3x3, ch5x5_reduce, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = conv_bn_act(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(conv_bn_act(in_channels, ch3x3_reduce, 1),
                                     conv_bn_act(ch3x3_reduce, ch3x3, 3))
        self.branch3 = nn.Sequential(conv_bn_act(in_channels, ch5x5_reduce, 1),
                                     conv_bn_act(ch5x5_reduce, ch5x5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                     conv_bn_act(in_channels, pool_proj, 1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x):
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, dim=1)


# Table 1 of the paper: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) per module.
STAGE3 = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64)]
STAGE4 = [(192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
          (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128)]
STAGE5 = [(256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)]


class InceptionV1(nn.Module):
    """GoogLeNet without auxiliary heads; `imagenet_stem` picks the 224 px or the 32 px stem."""

    def __init__(self, *, num_classes, in_chans, imagenet_stem, drop_rate):
        super().__init__()
        if imagenet_stem:
            layers = [conv_bn_act(in_chans, 64, 7, stride=2), max_pool(),
                      conv_bn_act(64, 64, 1), conv_bn_act(64, 192, 3), max_pool()]
        else:
            layers = [conv_bn_act(in_chans, 192, 3)]
        in_channels = 192
        for stage_index, stage in enumerate((STAGE3, STAGE4, STAGE5)):
            if stage_index > 0:
                layers.append(max_pool())
            for config in stage:
                module = InceptionModule(in_channels, *config)
                layers.append(module)
                in_channels = module.out_channels
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x):
        features = self.features(x).mean(dim=(2, 3))
        return self.fc(self.dropout(features))


def inception_v1(*, num_classes, img_size, in_chans, drop_rate=0.0, drop_path_rate=0.0):
    """Inception V1 (GoogLeNet), CIFAR stem below 128 px, ImageNet stem from 128 px."""
    # The CIFAR layout's two stride-2 pools need at least 4 px to read more than padding.
    check_cnn_args("inception_v1", img_size=img_size, in_chans=in_chans, min_size=4,
                   drop_path_rate=drop_path_rate, drop_rate=drop_rate)
    return InceptionV1(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                       imagenet_stem=img_size >= IMAGENET_STEM_MIN_SIZE)
