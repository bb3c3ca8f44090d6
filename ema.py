"""Exponential moving averages of a network's weights: --model-ema (every script) and the temporal mean
network of PCL (train_pcl.py).

theta_avg <- decay * theta_avg + (1 - decay) * theta after each optimizer step, the first update a copy:
the average of torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn (DeiT and CeiT keep one
with decay 0.99996: Touvron et al. 2021, github.com/facebookresearch/deit main.py --model-ema-decay;
timm's ModelEma), computed here on the network's device with foreach kernels and the update count a
Python number, so that an update never waits for the host (AveragedModel keeps its count on the CPU and
copies it to the device at every update).
"""
import copy

import torch

from models import unwrap


def blend(averages, values, weight):
    """averages <- averages + weight * (values - averages), in place (a lerp): `weight` a number (one
    torch._foreach_lerp_, as get_ema_multi_avg_fn), or a device scalar, which a captured step reads anew
    each time (PCL's temporal mean: its decay changes every step)."""
    if not averages:
        return
    if isinstance(weight, torch.Tensor):
        steps = torch._foreach_sub(values, averages)
        torch._foreach_mul_(steps, weight)
        torch._foreach_add_(averages, steps)
    else:
        torch._foreach_lerp_(averages, values, weight)


class ExponentialAverage:
    """The exponential moving average of one network: `module`, a copy of it whose parameters and floating
    buffers (BatchNorm's running statistics) follow the network's with `decay`, and whose integer buffers
    (BatchNorm's batch counter) are copied from it. state_dict() is AveragedModel's: the module's tensors
    under "module." and the update count as "n_averaged"."""

    def __init__(self, net, decay):
        self.decay, self.count = decay, 0
        self.module = copy.deepcopy(unwrap(net)).requires_grad_(False)

    def _pairs(self, net):
        """(averaged floating tensors, the network's), (averaged integer buffers, the network's)."""
        net = unwrap(net)
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*net.parameters(), *net.buffers())]
        floating = [i for i, t in enumerate(mine) if t.is_floating_point()]
        integer = [i for i, t in enumerate(mine) if not t.is_floating_point()]
        return ([mine[i] for i in floating], [theirs[i] for i in floating]), ([mine[i] for i in integer], [theirs[i] for i in integer])

    @torch.no_grad()
    def update(self, net):
        """Fold the network's weights after this step into the average (the first update copies them)."""
        (averages, values), (counters, counts) = self._pairs(net)
        if self.count == 0:
            torch._foreach_copy_(averages, values)
        else:
            blend(averages, values, 1 - self.decay)
        if counters:
            torch._foreach_copy_(counters, counts)
        self.count += 1

    def state_dict(self):
        """The averaged module's tensors ("module.*") and the update count ("n_averaged")."""
        return {**{f"module.{key}": value for key, value in self.module.state_dict().items()},
                "n_averaged": torch.tensor(self.count)}

    def load_state_dict(self, state):
        """Restore what state_dict() saved (or an AveragedModel's state: the same keys)."""
        self.module.load_state_dict({key[len("module."):]: value for key, value in state.items() if key.startswith("module.")})
        self.count = int(state["n_averaged"])


class ModelEma:
    """--model-ema DECAY: the averages of a group's networks (none with decay None: every method is then
    a no-op); a --freeze network, which never changes, has none. Evaluated beside the networks every
    epoch; state_dict()/load_state_dict() go into the scripts' checkpoint state."""

    def __init__(self, nets, decay, frozen=()):
        self.decay = decay
        self.averages = [] if decay is None else [None if i in frozen else ExponentialAverage(net, decay)
                                                  for i, net in enumerate(nets)]

    def __bool__(self):
        return bool(self.averages)

    def update(self, nets):
        """Fold the networks' weights after this step into the averages."""
        for average, net in zip(self.averages, nets):
            if average is not None:
                average.update(net)

    def modules(self, nets):
        """The networks to evaluate: each average, or the network itself when it has none (frozen)."""
        return [net if average is None else average.module for average, net in zip(self.averages, nets)]

    def state_dict(self):
        """Each average's weights, buffers and update count ({} when off)."""
        if not self.averages:
            return {}
        return {"decay": self.decay, "averages": [None if a is None else a.state_dict() for a in self.averages]}

    def load_state_dict(self, state):
        """Restore what state_dict() saved."""
        for average, saved in zip(self.averages, state["averages"]):
            if average is not None:
                average.load_state_dict(saved)
