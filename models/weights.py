"""Weight files for --init: one network of this repository's checkpoints, a plain state_dict, or a
torchvision/timm weight file (.pth, .safetensors), checked tensor by tensor against the network.
Problems raise ValueError with a one-line message."""
import os
import re

import torch


def net_labels(names):
    """Unique display labels: net0_resnet32, net1_vit_tiny, net2_tv_resnet18 (a zoo prefix's colon
    is not allowed in TensorBoard tags), ..."""
    return [f"net{i}_{name.replace(':', '_')}" for i, name in enumerate(names)]


def load_initial_weights(net, path, pick, *, label, reset_classifier):
    """Load an --init file into `net` (load_state); returns its notes (what was adapted), one line each."""
    return load_state(net, read_weight_file(path, pick), source=f"--init '{path}'", label=label,
                      reset_classifier=reset_classifier)


def load_state(net, state, *, source, label, reset_classifier=False, replace_head=False):
    """Load the tensors `state` into `net`; ValueError naming the first tensor that is missing, left over or of
    another shape; returns notes, one line each, of what was adapted: an input convolution of 3 channels for a
    network of another count (adapt_input_channels), and, with replace_head, a classifier of another class
    count, which keeps its fresh weights (with reset_classifier every classifier does)."""
    own, head, notes = net.state_dict(), classifier_keys(net), []
    skip = set(head) if reset_classifier else set()
    if replace_head and any(key in state and state[key].shape != own[key].shape for key in head):
        skip |= set(head)
        classes = next(state[key].shape[0] for key in sorted(head) if key in state and state[key].ndim >= 1)
        notes.append(f"{label}: classifier re-initialised ({classes} classes in the weights, {own[sorted(head)[0]].shape[0]} here)")
    adapted = dict(state)
    for key, value in own.items():
        if key in skip:
            continue
        if key not in state:
            raise ValueError(f"{source}: {label} has a tensor '{key}' that the file lacks (weights of another architecture?)")
        if state[key].is_floating_point() != value.is_floating_point():
            raise ValueError(f"{source}: tensor '{key}' is {str(state[key].dtype).replace('torch.', '')} in the file "
                             f"but {str(value.dtype).replace('torch.', '')} in {label} (not the same kind of weights)")
        if state[key].shape != value.shape and is_input_conv(state[key], value):
            adapted[key] = adapt_input_channels(state[key], value.shape[1])
            notes.append(f"{label}: '{key}' adapted from {state[key].shape[1]} to {value.shape[1]} input channel"
                         f"{'s' if value.shape[1] > 1 else ''} ({'summed' if value.shape[1] == 1 else 'repeated and scaled'}, "
                         f"as timm's adapt_input_conv)")
        elif state[key].shape != value.shape:
            hint = "; --reset-classifier keeps a fresh classifier for another class count" if key in head else ""
            raise ValueError(f"{source}: tensor '{key}' is {tuple(state[key].shape)} in the file "
                             f"but {tuple(value.shape)} in {label}{hint}")
    extra = next((key for key in state if key not in own), None)
    if extra is not None:
        raise ValueError(f"{source}: the file's tensor '{extra}' has no place in {label} (weights of another architecture?)")
    net.load_state_dict({key: value for key, value in adapted.items() if key not in skip}, strict=False)
    return notes


def is_input_conv(weight, own):
    """True for an RGB input convolution's weight (out, 3, kh, kw) where the network's has another channel count."""
    return (weight.ndim == 4 and own.ndim == 4 and weight.shape[1] == 3 and own.shape[1] != 3
            and weight.shape[0] == own.shape[0] and weight.shape[2:] == own.shape[2:])


def adapt_input_channels(weight, in_chans):
    """An RGB input convolution's weight for `in_chans` channels, as timm's adapt_input_conv
    (timm/models/_manipulate.py): one channel gets the sum of the three kernels (a grey image then gives the
    response a grey RGB image would); others the kernels repeated over the channels, scaled by 3 / in_chans."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (3 / in_chans)


def classifier_keys(net):
    """State-dict keys of the network's classifier(s): those its family names (classifier_names(): the
    heads of a branched network, the exits' of a BYOT network), timm's get_classifier(), else its last
    Linear or Conv2d module (SqueezeNet's classifier is a 1x1 convolution)."""
    if hasattr(net, "classifier_names"):
        return {f"{name}.{key}" for name in net.classifier_names() for key in net.get_submodule(name).state_dict()}
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    last = None
    for name, module in net.named_modules():
        if module is head or (head is None and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))):
            last = name
    return set() if not last else {f"{last}.{key}" for key in net.get_submodule(last).state_dict()}


def read_weight_file(path, pick):
    """The state dict of an --init file: one network of this repository's checkpoint (`pick`: index or
    label), a plain state_dict (or one under 'state_dict'/'model', as timm's and torchvision's
    reference training scripts save it) or a .safetensors file, without DDP's 'module.' and
    torch.compile's '_orig_mod.' key prefixes."""
    if not os.path.isfile(path):
        raise ValueError(f"--init: weight file '{path}' does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            content = load_file(path)
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ValueError(f"--init '{path}': .safetensors files need the safetensors package: pip install safetensors") from None
    except Exception as error:  # torch and safetensors raise several types for foreign or truncated files
        raise ValueError(f"--init '{path}' is not a readable weight file ({type(error).__name__}); expected a "
                         f"torch.save file of tensors (.pt, .pth) or a .safetensors file") from None
    if isinstance(content, dict) and "nets" in content and "models" in content:
        content = pick_network(content, path, pick)
    elif pick is not None:
        raise ValueError(f"--init '{path}@{pick}': @ picks a network of this repository's checkpoints; '{path}' is a plain weight file")
    else:
        content = next((content[key] for key in ("state_dict", "model") if isinstance(content, dict)
                        and isinstance(content.get(key), dict)), content)
    if not isinstance(content, dict) or not content or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"--init '{path}' holds no state_dict (a dict of tensor names to tensors)")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", key): value for key, value in content.items()}


def pick_network(ckpt, path, pick):
    """One network's state dict of this repository's checkpoint: the only one, or `pick` (index or label)."""
    labels = net_labels(ckpt["models"])
    n = len(labels)
    if pick is None and n > 1:
        raise ValueError(f"--init '{path}' holds {n} networks ({', '.join(labels)}); pick one with {path}@K (0..{n - 1}) or {path}@LABEL")
    index = 0 if pick is None else int(pick) if re.fullmatch(r"[0-9]+", pick) else labels.index(pick) if pick in labels else None
    if index is None or index >= n:
        raise ValueError(f"--init '{path}@{pick}': no such network; the file holds {', '.join(labels)} (pick by index 0..{n - 1} or label)")
    return ckpt["nets"][index]
