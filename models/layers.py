"""Helpers the CNN families of this package share: argument checks, He initialisation, the
conv-BN-activation unit and the input size from which the ImageNet stems are used."""
from torch import nn

# From this size on the ImageNet stems (MobileNet, Inception) leave at least a 4x4 map before the head.
IMAGENET_STEM_MIN_SIZE = 128


def check_cnn_args(model_name, *, img_size, in_chans, min_size, drop_path_rate, drop_rate=0.0):
    """Raise a readable ValueError for a CNN argument the model cannot honour."""
    # Every model accepts drop_path_rate (one create_model interface; train_ceit.py passes it), but
    # only the transformers implement drop path: here a non-zero rate would do nothing, so it is refused.
    if drop_path_rate:
        raise ValueError(f"{model_name}: drop_path_rate={drop_path_rate} given, but drop path "
                         f"(stochastic depth) is for the transformer models; CNNs take only 0.0")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"{model_name}: drop_rate must be in [0, 1), got {drop_rate}")
    if in_chans < 1:
        raise ValueError(f"{model_name}: in_chans must be >= 1, got {in_chans}")
    if img_size < min_size:
        raise ValueError(f"{model_name}: img_size {img_size} too small, needs >= {min_size}")


def kaiming_init(model):
    """He-normal conv weights (fan-in, ReLU gain), BN as identity, zero biases; the classifier's
    weight keeps PyTorch's default (small) initialisation."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            # fan-in also suits depthwise convs, whose fan-out would count all channels.
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # He-normal on the classifier (no ReLU follows it) starts with logits of several units
            # and an initial loss far above ln(C); a network that distils from a peer in its first
            # steps then receives very large gradients. The default init starts near ln(C).
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def conv_bn_act(in_channels, out_channels, kernel_size, stride=1, activation=nn.ReLU, groups=1):
    """Conv (no bias, 'same' padding) + BN + activation."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                  groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        activation(inplace=True),
    )
