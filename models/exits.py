"""Networks with early exits for self-distillation: Be Your Own Teacher (BYOT; Zhang et al., ICCV 2019,
arXiv 1905.08094).

A registered CIFAR ResNet or Wide ResNet (the networks of models/branched.py's BRANCHABLE: one flat
`features` Sequential whose second and third stages start with a stride-2 block, then `fc`) gets a
shallow classifier after every stage but the last; the deepest classifier is the network's own.
A shallow classifier is the ICCV paper's bottleneck, in the form of the ICCV-style reimplementation
github.com/luanyunteng/pytorch-be-your-own-teacher @8045079 (models/resnet.py): 1x1 conv to a quarter
of the stage's channels, BN, ReLU; a k x k conv of stride k (k = 2 per stage between the exit and the
deepest stage), BN, ReLU; 1x1 conv up to the deepest stage's width, BN, ReLU; global average pooling
and a linear classifier. Its pooled features therefore have the deepest features' width, which the
feature hint compares (losses.self_distillation).

`forward(x)` is the base network's (the deepest exit, the deployed network: the repository's model
contract); `forward(x, all_exits=True)` returns every exit's logits and pooled features, the deepest
last. Registered name: `byot:BASE` (models.create_model).
"""
from typing import NamedTuple

import torch
from torch import nn

from .branched import BRANCHABLE
from .layers import kaiming_init


class ExitOutputs(NamedTuple):
    """Every exit's logits (k, B, C) and pooled features (k, B, C3), the shallowest first, the deepest last."""
    logits: torch.Tensor
    features: torch.Tensor


def stage_starts(features):
    """Indices in a base network's `features` of the first blocks of stages 2 and 3 (the stride-2 blocks)."""
    starts = [index for index, module in enumerate(features) if hasattr(module, "conv1") and module.conv1.stride[0] == 2]
    if len(starts) != 2:
        raise ValueError(f"expected two stride-2 blocks (the first of stages 2 and 3), found {len(starts)}")
    return starts


def shallow_classifier(in_channels, out_channels, stride, num_classes):
    """BYOT's bottleneck exit: 1x1 to in/4, k x k stride k, 1x1 to out_channels (each BN-ReLU), pooled, linear."""
    middle = max(in_channels // 4, 1)
    layers = [nn.Conv2d(in_channels, middle, 1, bias=False), nn.BatchNorm2d(middle), nn.ReLU(inplace=True),
              nn.Conv2d(middle, middle, stride, stride, bias=False), nn.BatchNorm2d(middle), nn.ReLU(inplace=True),
              nn.Conv2d(middle, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    head = nn.ModuleDict({"bottleneck": nn.Sequential(*layers), "fc": nn.Linear(out_channels, num_classes)})
    kaiming_init(head)
    return head


class ExitNet(nn.Module):
    """A base network (its `features` and `fc`, under their own names, so that the deepest exit's weights
    are the base network's) with a shallow classifier after stages 1 and 2 (`exits`)."""

    def __init__(self, network, base):
        super().__init__()
        self.base = base
        self.features, self.fc = network.features, network.fc
        self.starts = stage_starts(network.features)
        deepest = network.fc.in_features
        widths = [network.features[start].conv1.in_channels for start in self.starts]  # stages 1 and 2's outputs
        self.exits = nn.ModuleList(shallow_classifier(width, deepest, 2 ** (len(self.starts) - i), network.fc.out_features)
                                   for i, width in enumerate(widths))

    @property
    def num_exits(self):
        """Exits k: the shallow ones and the deepest."""
        return len(self.exits) + 1

    def forward(self, x, all_exits=False):
        """The deepest exit's logits (the base network's forward); with all_exits, ExitOutputs of every exit."""
        if not all_exits:
            return self.fc(self.features(x).mean(dim=(2, 3)))
        pooled, start = [], 0
        for exit_, end in zip(self.exits, self.starts):
            x = self.features[start:end](x)
            pooled.append(exit_["bottleneck"](x).mean(dim=(2, 3)))
            start = end
        pooled.append(self.features[start:](x).mean(dim=(2, 3)))
        logits = [exit_["fc"](f) for exit_, f in zip(self.exits, pooled)] + [self.fc(pooled[-1])]
        return ExitOutputs(torch.stack(logits), torch.stack(pooled))

    def classifier_names(self):
        """The deepest classifier and the shallow exits' (not their bottlenecks)."""
        return ["fc"] + [f"exits.{i}.fc" for i in range(len(self.exits))]

    def deployed_state_dict(self):
        """The deepest exit, the base network, under its own names (`features.*`, `fc.*`): loadable with
        strict=True into `models.create_model(base, ...)`."""
        return {key: value for key, value in self.state_dict().items() if not key.startswith("exits.")}


def is_exit_name(name):
    """True for a name of the form byot:BASE."""
    return isinstance(name, str) and name.startswith("byot:")


def resolve_exit_name(name):
    """The canonical byot:BASE (BASE resolved); ValueError in one line otherwise."""
    from . import resolve_name  # here: models/__init__.py imports this file
    base = name.split(":", 1)[1]
    base = resolve_name(base) if ":" not in base else base
    if base not in BRANCHABLE:
        raise ValueError(f"'{name}': {name.split(':', 1)[1]} has no stages for BYOT's exits; choose from: {', '.join(BRANCHABLE)}")
    return f"byot:{base}"


def create_exit_net(name, *, num_classes, img_size, in_chans, **kwargs):
    """The network byot:BASE: BASE with BYOT's shallow classifiers."""
    from . import create_model
    base = resolve_exit_name(name).split(":", 1)[1]
    return ExitNet(create_model(base, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs), base)


def exit_members(name):
    """The rows byot:BASE reports, [(label, BASE), ...]: the deepest exit (deployed) first, then exits 1, 2."""
    base = resolve_exit_name(name).split(":", 1)[1]
    return [(f"deepest_{base}", base), (f"exit1_{base}", base), (f"exit2_{base}", base)]
