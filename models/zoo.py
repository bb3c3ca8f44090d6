"""Networks of the field's model zoos, built by prefixed name through models.create_model:

    tv:NAME    a torchvision.models classification model (torchvision.models.list_models(module=torchvision.models))
    timm:NAME  a timm model (timm.list_models()); timm is imported only when such a name is used

Built with random weights (weights=None, pretrained=False); --pretrained loads the library's own pretrained
weights afterwards (pretrained_state), and other trained weights come from files
(the training scripts' --init), never from a download.
"""
import os
import urllib.parse

import torch
from torch import nn

PREFIXES = ("tv:", "timm:")

# torchvision builders that fix their input size at construction (torchvision.models.vit_b_16 and
# maxvit_t: keyword `image_size` / `input_size`); the other classification models pool adaptively.
TV_SIZE_KEYWORD = {"vit_": "image_size", "maxvit_": "input_size"}
# GoogLeNet and Inception v3 return auxiliary outputs in train mode unless aux_logits=False
# (torchvision.models.googlenet / inception_v3 docs); the repository's contract is plain logits.
TV_EXTRA = {"googlenet": {"aux_logits": False, "init_weights": True},
            "inception_v3": {"aux_logits": False, "init_weights": True}}


def is_zoo_name(name):
    """True for a tv:NAME or timm:NAME model name."""
    return name.lower().startswith(PREFIXES)


def torchvision_models():
    """The classification models of torchvision.models (not detection, segmentation or video)."""
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


def import_timm():
    """The timm module; ValueError in one line when it is not installed."""
    try:
        import timm
    except ImportError:
        raise ValueError("timm: models need the timm package, which is not installed: pip install timm") from None
    return timm


def resolve_zoo_name(name):
    """Canonical 'tv:NAME' / 'timm:NAME' for a zoo name; ValueError when the zoo has no such model."""
    prefix, _, model = name.partition(":")
    prefix = prefix.lower()
    if prefix == "tv":
        if model not in torchvision_models():
            raise ValueError(f"unknown torchvision model '{model}' in '{name}'; tv: takes a torchvision "
                             f"classification model: {', '.join(torchvision_models())}")
    elif not import_timm().is_model(model):
        raise ValueError(f"unknown timm model '{model}' in '{name}'; timm: takes a name of timm.list_models(), e.g. timm:resnet18")
    return f"{prefix}:{model}"


def create_zoo_model(name, *, num_classes, img_size, in_chans, **kwargs):
    """Build a tv:/timm: model with random weights for the class count and input geometry."""
    name = resolve_zoo_name(name)
    prefix, _, model = name.partition(":")
    build = build_timm if prefix == "timm" else build_torchvision
    try:
        net = build(model, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, ArithmeticError, IndexError) as error:
        # (a model too small for the size may divide by zero or index past its grid while building)
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        raise ValueError(f"{name} cannot be built for {num_classes} classes at {in_chans}x{img_size}px ({detail})") from None
    check_geometry(net, name, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    return net


def build_timm(model, *, num_classes, img_size, in_chans, **kwargs):
    """timm.create_model with random weights; img_size only where the model takes it."""
    timm = import_timm()
    config = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    try:  # timm's transformers take img_size (their patch grid depends on it); its CNNs have no such argument
        return timm.create_model(model, img_size=img_size, **config)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
        return timm.create_model(model, **config)


def build_torchvision(model, *, num_classes, img_size, in_chans, **kwargs):
    """torchvision.models.get_model with random weights, its stem rebuilt for `in_chans` channels."""
    import torchvision
    config = dict(weights=None, num_classes=num_classes, **TV_EXTRA.get(model, {}), **kwargs)
    for start, keyword in TV_SIZE_KEYWORD.items():
        if model.startswith(start):
            config[keyword] = img_size if keyword == "image_size" else (img_size, img_size)
    net = torchvision.models.get_model(model, **config)
    if in_chans != 3:
        replace_first_conv(net, in_chans)
    return net


def replace_first_conv(net, in_chans):
    """Give a torchvision model `in_chans` input channels: its first Conv2d (the stem, which takes
    the RGB image in every torchvision classification model) is rebuilt with the same settings."""
    name, conv = next((name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d))
    stem = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode)
    parent, _, attribute = name.rpartition(".")
    setattr(net.get_submodule(parent), attribute, stem)


def pretrained_state(name):
    """The state_dict of a tv:/timm: model's pretrained weights (torchvision's DEFAULT weights, timm's default
    pretrained tag), from the library's cache (torch.hub's for torchvision, the Hugging Face hub's or
    torch.hub's for timm), downloaded into it when missing; ValueError in one line when they cannot be had."""
    prefix, _, model = resolve_zoo_name(name).partition(":")
    if prefix == "tv":
        import torchvision
        try:
            weights = torchvision.models.get_model_weights(model).DEFAULT
        except (ValueError, KeyError) as error:
            raise ValueError(f"--pretrained: torchvision has no pretrained weights for {model} ({error})") from None
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(weights.url).path))
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as error:  # noqa: BLE001 -- offline: URLError, socket and HTTP errors, a bad file
            raise ValueError(f"--pretrained: {name}'s weights ({weights.name}) are not in {cached} and could not be "
                             f"downloaded ({type(error).__name__}: {' '.join(str(error).split())[:100]}); on a machine "
                             f"without network, copy the file there") from None
    timm = import_timm()
    try:
        return timm.create_model(model, pretrained=True).state_dict()
    except Exception as error:  # noqa: BLE001 -- offline: the hub's errors differ by version
        raise ValueError(f"--pretrained: {name}'s weights could not be loaded from the Hugging Face hub or its cache "
                         f"({type(error).__name__}: {' '.join(str(error).split())[:100]}); on a machine without network, "
                         f"download them into the cache first (HF_HUB_CACHE)") from None


@torch.no_grad()
def check_geometry(net, name, *, num_classes, img_size, in_chans):
    """One eval-mode forward of a blank image: a size the model cannot take is a readable ValueError
    here, not a traceback in the first training step."""
    mode = net.training
    try:
        logits = net.eval()(torch.zeros(1, in_chans, img_size, img_size))
    except (RuntimeError, ValueError, AssertionError, ArithmeticError, IndexError) as error:
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:160]
        raise ValueError(f"{name} cannot take {in_chans}x{img_size}px inputs ({detail}); choose another --img-size") from None
    finally:
        net.train(mode)
    if not isinstance(logits, torch.Tensor) or logits.shape != (1, num_classes):
        raise ValueError(f"{name} does not return plain logits of shape (B, {num_classes}); it is not supported")
