"""Train a vision transformer (CeiT by default, ViT too) alone with the DeiT/CeiT recipe (SPEC 4):
AdamW, linear warm-up then cosine decay, label smoothing, mixup/cutmix and drop-path.

    python train_ceit.py --model ceit_tiny --dataset cifar100
    python train_ceit.py --model ceit --dataset imagenet --data-dir /data/imagenet --img-size 224
"""
import argparse
import random

import torch
import torch.nn.functional as F

import models
import engine
import utils


def get_args_parser():
    """Flags: the shared ones with the CeiT/DeiT recipe as defaults, plus mixup/cutmix/drop-path."""
    parser = utils.get_args_parser(
        "Train a CeiT or ViT with the transformer recipe.", epochs=300, optimizer="adamw",
        weight_decay=0.05, warmup_epochs=5, label_smoothing=0.1)
    parser.set_defaults(model="ceit")
    add = parser.add_argument
    add("--mixup", type=float, default=0.8, help="mixup Beta(alpha, alpha) parameter (DeiT: 0.8; 0 = off)")
    add("--cutmix", type=float, default=1.0, help="cutmix Beta(alpha, alpha) parameter (DeiT: 1.0; 0 = off)")
    add("--mix-prob", type=float, default=1.0, help="probability that a batch is mixed at all (DeiT: 1.0)")
    add("--switch-prob", type=float, default=0.5, help="probability of cutmix rather than mixup when both are on (DeiT: 0.5)")
    add("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block (DeiT/CeiT: 0.1)")
    add("--decay-norm-and-bias", action=argparse.BooleanOptionalAction, default=False,
        help="apply weight decay to norms, biases and embeddings too (DeiT: no)")
    return parser


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


def main(args):
    """Train one transformer on args.dataset; returns the results dict."""
    utils.check_args(args)
    names = utils.model_names(args)
    if names[0] not in models.TRANSFORMERS:
        raise utils.UsageError(f"train_ceit.py trains transformers ({', '.join(sorted(models.TRANSFORMERS))}); "
                               f"use train.py for {names[0]}")
    for flag in ("mixup", "cutmix", "drop_path"):
        if getattr(args, flag) < 0:
            raise utils.UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.lr is None:  # DeiT's linear scaling rule: 5e-4 per 512 images
        args.lr = [5e-4 * args.batch_size / 512]
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(names, data.info, rt, drop_path_rate=args.drop_path)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    run = engine.Run(args, "ceit", names, rt, data, nets, optimizers, val_loader, test_loader, len(train_loader))
    net, optimizer = nets[0], optimizers[0]
    scaler = engine.make_scaler(rt, run)
    rng = random.Random(args.seed)  # host-side draws of lam and boxes: no device synchronisation
    if run.resume_extra("mix_rng"):
        rng.setstate((3, tuple(run.resume_extra("mix_rng")), None))

    def transformer_step(images, targets, labels):  # the whole step: capturable in a CUDA graph
        with utils.autocast(rt):
            logits = net(utils.to_input(images, rt)).float()
        loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        correct = (logits.argmax(-1) == labels).sum()
        return torch.stack([loss.detach(), correct, torch.full_like(loss, labels.numel())])[None]

    captured = engine.CapturedStep(transformer_step, enabled=rt.cuda_graphs)

    def train_step(step, images, labels):
        # Mixup/cutmix draws happen on the host, outside the captured step.
        images, targets = mix_batch(images, labels, data.info.num_classes, args, rng)
        return captured(images, targets, labels)

    def state():
        return {"scaler": scaler.state_dict(), "mix_rng": list(rng.getstate()[1])}

    return engine.train_loop(args, rt, run, train_loader, schedule, ("loss", "correct", "seen"), train_step, state)


if __name__ == "__main__":
    utils.run(main, get_args_parser())
