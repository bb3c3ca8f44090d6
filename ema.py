"""--model-ema DECAY: an exponential moving average of every network's weights and buffers, updated
after each optimizer step, evaluated beside the networks every epoch, checkpointed and resumed exactly.

The averages are torch.optim.swa_utils.AveragedModel copies with its EMA update
(get_ema_multi_avg_fn): theta_ema <- decay * theta_ema + (1 - decay) * theta, buffers (BatchNorm's
running statistics) averaged too; as AveragedModel does, the first update copies the network. DeiT and
CeiT keep such an average with decay 0.99996 (Touvron et al. 2021, github.com/facebookresearch/deit
main.py --model-ema-decay; timm's ModelEma).
"""
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models import unwrap


class ModelEma:
    """The averages of a group's networks (none with decay None: every method is then a no-op); a
    --freeze network, which never changes, has none. state_dict()/load_state_dict() go into the
    scripts' checkpoint state."""

    def __init__(self, nets, decay, frozen=()):
        self.decay = decay
        self.averages = [] if decay is None else [
            None if i in frozen else AveragedModel(unwrap(net), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
            for i, net in enumerate(nets)]

    def __bool__(self):
        return bool(self.averages)

    @torch.no_grad()
    def update(self, nets):
        """Fold the networks' weights after this step into the averages."""
        for average, net in zip(self.averages, nets):
            if average is not None:
                average.update_parameters(unwrap(net))

    def modules(self, nets):
        """The networks to evaluate: each average, or the network itself when it has none (frozen)."""
        return [net if average is None else average for average, net in zip(self.averages, nets)]

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
