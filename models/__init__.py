"""Model registry: every network is built by name through `create_model`.

Contract (tested for every registered name in tests/test_models.py):
    create_model(name, *, num_classes, img_size, in_chans, **kwargs) -> nn.Module
    forward(x: (B, in_chans, img_size, img_size)) -> logits (B, num_classes), train and eval mode.
Geometry (strides, patch grid) is derived from img_size; a size a model cannot take raises
ValueError with a readable message.

Besides the registered names below, `tv:NAME` builds a torchvision classification model and
`timm:NAME` a timm model, with random weights or, with --pretrained, its library's (models/zoo.py), `one:BASE:M` / `okddip:BASE:M` /
`pcl:BASE:M` the branched networks of ONE, OKDDip and PCL on a CIFAR ResNet or Wide ResNet
(models/branched.py), and `byot:BASE` such a network with BYOT's early exits (models/exits.py).
"""
import torch

from . import ceit, vit
from .ceit import authors_ceit, ceit_base, ceit_small, ceit_tiny
from .inception import inception_v1
from .mobilenet import authors_mobilenet, mobilenet_v1, mobilenet_v2
from .resnet import resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202
from .vit import authors_vit, vit_base, vit_small, vit_tiny
from .wideresnet import wrn_16_8, wrn_28_10, wrn_40_2
from .branched import BRANCHABLE, create_branched_by_name, is_branched_name, resolve_branched
from .exits import create_exit_net, is_exit_name, resolve_exit_name
from .zoo import create_zoo_model, is_zoo_name, resolve_zoo_name

MODELS = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet1202": resnet1202,
    "wrn_16_8": wrn_16_8,
    "wrn_28_10": wrn_28_10,
    "wrn_40_2": wrn_40_2,
    "mobilenet_v1": mobilenet_v1,
    "mobilenet_v2": mobilenet_v2,
    "inception_v1": inception_v1,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "ceit_tiny": ceit_tiny,
    "ceit_small": ceit_small,
    "ceit_base": ceit_base,
    # The competitive-distillation authors' networks behind their short names (bugs fixed).
    "vit": authors_vit,
    "mobilenet": authors_mobilenet,
    "ceit": authors_ceit,
}

# Short names used by the authors' README commands (`--model resnet`, `--student vit`, ...).
ALIASES = {
    "resnet": "resnet32",
    "wideresnet": "wrn_28_10",
    "inception": "inception_v1",
    "googlenet": "inception_v1",
}

# The registered transformers: the models of vit.py and ceit.py.
TRANSFORMERS = frozenset(name for name, build in MODELS.items() if build.__module__ in (vit.__name__, ceit.__name__))


def is_transformer(model):
    """True for a transformer, given a registered name or a built module: the name is one of
    TRANSFORMERS; the module names the parameters the DeiT recipe exempts from weight decay
    (no_weight_decay(), as the transformers here and timm's do). Transformers get stochastic depth
    (--drop-path) and the DeiT decay exemptions; CNNs neither."""
    if isinstance(model, str):
        return model in TRANSFORMERS
    return hasattr(model, "no_weight_decay")


def list_models(aliases=False):
    """Sorted registered model names (with the short aliases when `aliases` is true)."""
    names = set(MODELS) | (set(ALIASES) if aliases else set())
    return sorted(names)


def resolve_name(name):
    """Canonical registry name for `name` or an alias (or tv:/timm: zoo name); ValueError listing valid names otherwise."""
    if is_zoo_name(name):
        return resolve_zoo_name(name)
    if is_branched_name(name):
        return resolve_branched(name)
    if is_exit_name(name):
        return resolve_exit_name(name)
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose from: {', '.join(list_models(aliases=True))}, "
                         f"or tv:NAME (torchvision), timm:NAME (timm)")
    return key


def create_model(name, *, num_classes, img_size, in_chans, **kwargs):
    """Build model `name` (or an alias) for the given class count and input geometry."""
    key = resolve_name(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if is_zoo_name(key):
        return create_zoo_model(key, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)
    if is_branched_name(key):
        return create_branched_by_name(key, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)
    if is_exit_name(key):
        return create_exit_net(key, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)
    return MODELS[key](num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)


def unwrap(net):
    """The plain module inside DDP and torch.compile wrappers, in either order."""
    while True:
        if isinstance(net, torch.nn.parallel.DistributedDataParallel):
            net = net.module
        elif "_orig_mod" in net._modules:  # torch.compile's OptimizedModule holds the module it compiled
            net = net._orig_mod
        else:
            return net
