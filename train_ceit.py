"""Train a vision transformer (CeiT by default, ViT too) alone with the DeiT/CeiT recipe (Touvron
et al. 2021; Yuan et al. 2021; the defaults of github.com/coeusguo/ceit main.py): AdamW, linear
warm-up then cosine decay to an absolute 1e-5, label smoothing, mixup/cutmix, drop-path, RandAugment,
random erasing and repeated augmentation.

    python train_ceit.py --model ceit_tiny --dataset cifar100
    python train_ceit.py --model ceit --dataset imagenet --data-dir /data/imagenet --img-size 224
"""
import argparse
import random

import torch

import configs
import engine
import flags
import lifecycle
import models
import stopping
import utils
from datasets import augment
from datasets.loaders import per_image_steps, repeated_epoch_length
from errors import UsageError
from losses import accuracy, soft_target_cross_entropy


def get_args_parser():
    """Flags: the shared ones with the CeiT/DeiT recipe as defaults, plus mixup/cutmix, RandAugment, random
    erasing, repeated augmentation and the absolute final rate (CeiT's main.py defaults)."""
    parser = flags.get_args_parser(
        "Train a CeiT or ViT with the transformer recipe.", script="ceit", epochs=300, optimizer="adamw",
        weight_decay=0.05, warmup_epochs=5, label_smoothing=0.1, min_lr=None)
    parser.set_defaults(model="ceit")
    add = flags.adder(parser.add_argument_group("transformer recipe"))
    add("--mixup", type=float, default=0.8, valid="non-negative", help="mixup Beta(alpha, alpha) parameter (DeiT: 0.8; 0 = off)")
    add("--cutmix", type=float, default=1.0, valid="non-negative", help="cutmix Beta(alpha, alpha) parameter (DeiT: 1.0; 0 = off)")
    add("--mix-prob", type=float, default=1.0, valid="fraction", help="probability that a batch is mixed at all (DeiT: 1.0)")
    add("--switch-prob", type=float, default=0.5, valid="fraction",
        help="probability of cutmix rather than mixup when both are on (DeiT: 0.5)")
    add("--rand-augment", default=augment.RAND_AUGMENT_DEFAULT, metavar="CONFIG",
        help="RandAugment of each training image after the crop, flip and resize, in timm's config syntax (CeiT/DeiT main.py "
             "--aa: rand-m9-mstd0.5-inc1 = magnitude 9 of 10, 2 ops, magnitude noise std 0.5, the increasing op "
             "set); 'none' = off")
    add("--rand-augment-impl", default="auto", choices=augment.IMPLEMENTATIONS,
        help="who runs --rand-augment: timm's rand_augment_transform (the official recipe exactly), or "
             "torchvision's v2.RandAugment(num_ops=n, magnitude=m of 10), which has its own op set, applies every "
             "op it draws and has no magnitude noise (mstd, inc and p are not used); auto: timm when installed. "
             "The run records the one used")
    add("--reprob", type=float, default=0.25, valid="fraction",
        help="random erasing probability (CeiT/DeiT main.py --reprob 0.25, --remode pixel, --recount 1): one box "
             "of per-pixel N(0, 1) values on the normalised image, torchvision's v2.RandomErasing; 0 = off")
    add("--repeated-aug", action=argparse.BooleanOptionalAction, default=True,
        help="repeated augmentation (CeiT/DeiT main.py; DeiT's RASampler): each drawn image --aug-repeats times "
             "per epoch with different augmentations, dealt across the processes; an epoch keeps the data set's "
             "size rounded down to a multiple of 256, as DeiT's")
    add("--aug-repeats", type=int, default=3, valid=(lambda v: v >= 1, "a positive integer (1 = no repetition)"),
        help="copies of each drawn image per epoch with --repeated-aug (DeiT samplers.py: 3; timm's --aug-repeats)")
    add("--absolute-min-lr", type=float, default=1e-5, metavar="LR", valid="non-negative",
        help="cosine schedule: the final learning rate itself (CeiT/DeiT main.py --min-lr: 1e-5 at a peak of "
             "5e-4 x global batch / 512), never above the peak; --min-lr (a fraction of the peak) replaces it")
    # Runs recorded before these flags trained without them (and recorded their --min-lr, 0 by default, which
    # stands): their resumes and --config repeats keep them off.
    parser.older_runs = {**parser.older_runs, "rand_augment": "none", "reprob": 0.0, "repeated_aug": False}
    return parser


def check_recipe(args):
    """Refuse recipe flags that cannot work, in one line each, before any data loads; returns what the
    recipe computes from its flags: which library runs --rand-augment (auto: timm when installed) and the
    default learning rate (DeiT's linear scaling rule, 5e-4 per 512 images)."""
    computed = {"lr": list(args.lr) if args.lr else [5e-4 * args.batch_size / 512]}
    try:
        if augment.parse_rand_augment(args.rand_augment) is not None:
            computed["rand_augment_impl"] = augment.resolve_implementation(args.rand_augment_impl)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if {"min_lr", "absolute_min_lr"} <= (configs.given_flags(args) or frozenset()):
        raise UsageError("give --min-lr (a fraction of the peak) or --absolute-min-lr (a rate), not both")
    steps = [name for name, wanted in (("RandAugment", args.rand_augment != "none"), ("random erasing", args.reprob > 0),
                                       ("repeated augmentation", repeats(args) > 1)) if wanted]
    if args.loader == "gpu" and steps:
        raise UsageError(f"--loader gpu cannot apply {' and '.join(steps)} (per-image steps of the torch "
                         "loader); use --loader torch or auto, or turn them off (--rand-augment none, "
                         "--reprob 0, --no-repeated-aug)")
    return computed


def repeats(args):
    """Copies of each drawn image per epoch: --aug-repeats with --repeated-aug, else 1."""
    return args.aug_repeats if args.repeated_aug else 1


def absolute_final_rate(args):
    """Whether --absolute-min-lr sets the final rate: --min-lr is unset, or this command line gives
    --absolute-min-lr over a --config run's --min-lr."""
    over_config = "absolute_min_lr" in (configs.given_flags(args) or frozenset()) and args.resume is None
    return args.min_lr is None or over_config


def min_lr_fraction(args, peak):
    """The cosine schedule's final rate as a fraction of the peak rate `peak` (after --lr-scaling):
    --absolute-min-lr / peak, at most 1, or --min-lr (absolute_final_rate)."""
    return min(1.0, args.absolute_min_lr / peak) if absolute_final_rate(args) else args.min_lr


def describe_recipe(run):
    """The startup line of the per-image recipe, the epoch, the loader and the final rate."""
    args, info, min_lr = run.args, run.info, run.resolved["min_lr"]
    parts = [augment.describe(info) or "no RandAugment or random erasing"]
    if repeats(args) > 1:
        share = repeated_epoch_length(info.train_size, run.rt.world_size)
        parts.append(f"repeated augmentation x{repeats(args)} (DeiT's RASampler: {share} images per process "
                     f"and epoch of {info.train_size})")
    if info.in_memory and per_image_steps(info, repeats(args)):
        parts.append("torch loader (the gpu loader cannot apply them per image)")
    final = (f"min lr {args.absolute_min_lr:g} ({min_lr:.3g} of the peak)" if absolute_final_rate(args)
             else f"min lr {min_lr:g} of the peak (--min-lr)")
    return "recipe: " + ", ".join(parts) + (f"; cosine to {final}" if args.schedule == "cosine" else "")


class HostRandom(random.Random):
    """random.Random for host-side draws (no device synchronisation) whose state goes into
    checkpoints like the other resumable objects (state_dict/load_state_dict)."""

    def state_dict(self):
        """The Mersenne Twister state, as a list of ints."""
        return list(self.getstate()[1])

    def load_state_dict(self, state):
        """Restore what state_dict() returned."""
        self.setstate((3, tuple(state), None))


def mix_batch(images, labels, num_classes, args, rng):
    """Mixup or cutmix with the batch reversed as partner; returns images and soft targets.

    One lam per batch (DeiT's 'batch' mode). Cutmix's lam is corrected to the pasted box's true
    area. Targets carry label smoothing, so the loss is a plain soft-target cross-entropy.
    """
    smooth = args.label_smoothing
    one_hot = torch.zeros(len(labels), num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)
    targets = one_hot * (1 - smooth) + smooth / num_classes
    use_mixup, use_cutmix = args.mixup > 0, args.cutmix > 0
    if not (use_mixup or use_cutmix) or rng.random() >= args.mix_prob:
        return images, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < args.switch_prob)
    lam = rng.betavariate(args.cutmix, args.cutmix) if cutmix else rng.betavariate(args.mixup, args.mixup)
    partner = images.flip(0)
    if cutmix:
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
        top, left = rng.randint(0, height - cut_h), rng.randint(0, width - cut_w)
        images = images.clone()
        images[..., top:top + cut_h, left:left + cut_w] = partner[..., top:top + cut_h, left:left + cut_w]
        lam = 1 - cut_h * cut_w / (height * width)
    else:
        images = lam * images + (1 - lam) * partner
    return images, lam * targets + (1 - lam) * targets.flip(0)


def mixed_batch(run, global_step, images, labels):
    """The step's arguments: the batch mixed (mixup/cutmix, host-side draws outside the captured step), its
    soft targets and the labels."""
    images, targets = mix_batch(images, labels, run.info.num_classes, run.args, run.checkpoints.state["mix_rng"])
    return (images, targets, labels), None


def transformer_step(run, images, targets, labels):
    """One optimisation step against soft (mixed, smoothed) targets; returns its statistics."""
    net, optimizer = run.nets[0], run.optimizers[0]
    with utils.autocast(run.rt):
        logits = net(utils.to_input(images, run.rt)).float()
    loss = soft_target_cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    clipped = utils.step_optimizers([optimizer], run.scaler, run.args.clip_grad, run.args.clip_mode)
    # Against the unmixed labels: on mixed batches this understates what the network learned.
    return {"loss": loss.detach(), "acc": accuracy(logits, labels), **clipped}


def main(args):
    """Train one transformer on args.dataset; returns the results dict."""
    group = flags.check_args(args)
    if not models.is_transformer(group.names[0]):
        raise UsageError(f"train_ceit.py trains transformers ({', '.join(sorted(models.TRANSFORMERS))}); "
                         f"use train.py for {group.names[0]}")
    # RandAugment, random erasing and repeated augmentation run on the torch loader (--loader auto picks it)
    run = lifecycle.start_run(args, transformer_step, group=group, batch=mixed_batch, repeats=repeats(args),
                              computed=check_recipe(args), min_lr=lambda peak: min_lr_fraction(args, peak),
                              state={"mix_rng": HostRandom(args.seed)})  # host-side mixup draws, resumed exactly
    engine.print_main(run.rt, describe_recipe(run))
    for epoch in lifecycle.epochs(run):  # to --epochs, or --stop-after N; a signal between epochs: saved, exit 130/143
        stats = engine.train_one_epoch(run, epoch)  # a signal mid-epoch: last.pt after its step, exit 130/143
        evals = engine.evaluate_epoch(run, epoch)
        engine.log_epoch(run, epoch, stats, evals)  # NaN/inf training statistics: exit 3, nothing of the epoch saved
        run.checkpoints.save(epoch, evals)
    return lifecycle.finish(run)


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
