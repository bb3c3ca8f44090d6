"""The per-image augmentations of the transformer recipe (DeiT: Touvron et al. 2021; CeiT: Yuan et al.
2021): RandAugment on the PIL image and random erasing on the normalised tensor, built as timm's
create_transform builds them for DeiT's and CeiT's main.py. They are off unless asked for (train_ceit.py's
flags); datasets/sources.py puts them into the training transforms, which only the torch loader runs."""
import importlib.util
import re
from dataclasses import dataclass

from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2

# DeiT's and CeiT's main.py --aa, in timm's syntax: RandAugment at magnitude 9 (of 10), 2 ops per image
# (timm's default), Gaussian noise of std 0.5 on each op's magnitude, the ops whose severity increases with it.
RAND_AUGMENT_DEFAULT = "rand-m9-mstd0.5-inc1"
IMPLEMENTATIONS = ("auto", "timm", "torchvision")
# timm's magnitude scale: an op reaches its full range at magnitude 10 (timm.data.auto_augment _LEVEL_DENOM).
MAX_MAGNITUDE = 10
SYNTAX = "'none' or timm's syntax rand[-m<0..10>][-n<ops>][-mstd<std>][-inc<0|1>][-p<prob>], e.g. " + RAND_AUGMENT_DEFAULT


@dataclass(frozen=True)
class RandAugmentConfig:
    """A RandAugment config string's sections, defaulting as in timm's rand_augment_transform: magnitude 10,
    2 ops, each applied with probability 0.5, no magnitude noise, timm's plain (not increasing) op set."""
    magnitude: int = MAX_MAGNITUDE
    num_ops: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    increasing: bool = False


def parse_rand_augment(text):
    """None for 'none', else the RandAugmentConfig of a timm config string ('rand-m9-mstd0.5-inc1');
    ValueError in one line for anything else."""
    if text == "none":
        return None
    sections = text.split("-")
    if sections[0] != "rand":
        raise ValueError(f"--rand-augment '{text}': give {SYNTAX}")
    values = {}
    for section in sections[1:]:
        # as timm reads a section: the letters before the first digit name it, the rest is its value
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        key, value = match.groups() if match else (section, "")
        parse = {"m": int, "n": int, "p": float, "mstd": float, "inc": int}.get(key)
        if parse is None or key in values:
            what = "appears twice" if key in values else "is not a section this recipe takes"
            raise ValueError(f"--rand-augment '{text}': '{section}' {what}; give {SYNTAX}")
        try:
            values[key] = parse(value)
        except ValueError:
            raise ValueError(f"--rand-augment '{text}': '{section}' needs a number; give {SYNTAX}") from None
    config = RandAugmentConfig(magnitude=values.get("m", MAX_MAGNITUDE), num_ops=values.get("n", 2),
                               prob=values.get("p", 0.5), magnitude_std=values.get("mstd", 0.0),
                               increasing=bool(values.get("inc", 0)))
    for ok, meaning in ((0 <= config.magnitude <= MAX_MAGNITUDE, "the magnitude m must be in 0..10 (timm's scale)"),
                        (config.num_ops >= 1, "the op count n must be at least 1 ('none' turns RandAugment off)"),
                        (0 <= config.prob <= 1, "the probability p must be in [0, 1]"),
                        (config.magnitude_std >= 0, "the magnitude noise mstd must be >= 0"),
                        (values.get("inc", 0) in (0, 1), "inc must be 0 or 1")):
        if not ok:
            raise ValueError(f"--rand-augment '{text}': {meaning}")
    return config


def resolve_implementation(name):
    """--rand-augment-impl as the one that will run: auto is timm when it is importable, else torchvision;
    ValueError in one line for timm when it is not installed."""
    has_timm = importlib.util.find_spec("timm") is not None
    if name == "auto":
        return "timm" if has_timm else "torchvision"
    if name == "timm" and not has_timm:
        raise ValueError("--rand-augment-impl timm needs timm (pip install timm); --rand-augment-impl torchvision "
                         "runs torchvision's RandAugment instead")
    return name


def fill_color(mean):
    """timm's img_mean: the data set's mean colour in 0..255, the fill of rotated, sheared and translated corners."""
    return tuple(min(255, round(255 * m)) for m in mean)


def rand_augment(text, implementation, *, img_size, mean):
    """The RandAugment transform of PIL images that config `text` describes, by `implementation`.

    timm: timm.data.auto_augment.rand_augment_transform(text, hparams) with the hparams timm's
    create_transform gives it (transforms_factory.py: translate_const int(0.45 x size), img_mean the mean
    colour) and DeiT's/CeiT's --train-interpolation bicubic: the official recipe exactly. It draws from
    Python's random module and NumPy's global generator (datasets/loaders.py seeds both per image).

    torchvision: v2.RandAugment(num_ops=n, magnitude=m) with 11 magnitude bins, so that magnitude m reaches
    m/10 of each op's range as in timm (torchvision's default 31 bins would give m/30), bicubic, the same fill.
    It is torchvision's policy, not timm's: its op set (Identity, no Invert or SolarizeAdd) and ranges
    (Posterize keeps 4 to 8 bits), every drawn op applied (timm: each with probability p, 0.5), no
    magnitude noise (mstd) and no 'inc' variant; it draws from the torch generator only.
    """
    config = parse_rand_augment(text)
    if implementation == "timm":
        from timm.data.auto_augment import rand_augment_transform
        hparams = dict(translate_const=int(img_size * 0.45), img_mean=fill_color(mean), interpolation=Image.BICUBIC)
        transform = rand_augment_transform(text, hparams)
        for op in getattr(transform, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
        return transform
    return v2.RandAugment(num_ops=config.num_ops, magnitude=config.magnitude, num_magnitude_bins=MAX_MAGNITUDE + 1,
                          interpolation=InterpolationMode.BICUBIC, fill=list(fill_color(mean)))


def posterize(image, bits_to_keep, **_):
    """timm's posterize op for every bit count it asks for, 0 to 8. At magnitude 10 (9 plus its N(0, 0.5)
    noise: 2% of draws) timm's increasing variant keeps 0 bits, which Pillow applied as a black image
    (every pixel masked to 0, as TensorFlow's posterize does) before it began to refuse 0 (Pillow 13
    raises ValueError, which would end the run)."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def random_erasing(prob):
    """Random erasing (Zhong et al. 2020) of one box with probability `prob`, on the normalised image tensor:
    torchvision's v2.RandomErasing with value 'random', whose per-pixel N(0, 1) values are timm's 'pixel'
    mode (DeiT's --remode pixel, --recount 1), and timm's box: area 2% to 1/3 of the image, aspect ratio
    log-uniform in [0.3, 1/0.3], up to 10 tries to fit it. It draws from the torch generator."""
    return v2.RandomErasing(p=prob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value="random")


def uses_host_random(info):
    """Whether the training transforms of DataInfo `info` draw from Python's random and NumPy (timm's RandAugment)."""
    return bool(info.rand_augment) and info.rand_augment_impl == "timm"


def describe(info):
    """The per-image augmentations of DataInfo `info` in words, for the startup line ("" when there are none)."""
    parts = []
    if info.rand_augment:
        config = parse_rand_augment(info.rand_augment)
        if info.rand_augment_impl == "timm":
            parts.append(f"RandAugment {info.rand_augment} (timm's rand_augment_transform)")
        else:
            parts.append(f"RandAugment {config.num_ops} ops at magnitude {config.magnitude}/10 (torchvision's "
                         f"v2.RandAugment: its op set, every op applied, no magnitude noise)")
    if info.erase_prob:
        parts.append(f"random erasing p {info.erase_prob:g} (torchvision's v2.RandomErasing, per-pixel N(0, 1))")
    return ", ".join(parts)
