"""Train a vision transformer (CeiT by default, ViT too) alone with the DeiT/CeiT recipe (Touvron
et al. 2021; Yuan et al. 2021): AdamW, linear warm-up then cosine decay, label smoothing,
mixup/cutmix and drop-path.

    python train_ceit.py --model ceit_tiny --dataset cifar100
    python train_ceit.py --model ceit --dataset imagenet --data-dir /data/imagenet --img-size 224
"""
import functools
import random
import sys

import torch

import engine
import flags
import models
import utils
from losses import accuracy, soft_target_cross_entropy


def get_args_parser():
    """Flags: the shared ones with the CeiT/DeiT recipe as defaults, plus mixup/cutmix/drop-path."""
    parser = flags.get_args_parser(
        "Train a CeiT or ViT with the transformer recipe.", epochs=300, optimizer="adamw",
        weight_decay=0.05, warmup_epochs=5, label_smoothing=0.1)
    parser.set_defaults(model="ceit")
    add = parser.add_argument_group("transformer recipe").add_argument
    add("--mixup", type=float, default=0.8, help="mixup Beta(alpha, alpha) parameter (DeiT: 0.8; 0 = off)")
    add("--cutmix", type=float, default=1.0, help="cutmix Beta(alpha, alpha) parameter (DeiT: 1.0; 0 = off)")
    add("--mix-prob", type=float, default=1.0, help="probability that a batch is mixed at all (DeiT: 1.0)")
    add("--switch-prob", type=float, default=0.5, help="probability of cutmix rather than mixup when both are on (DeiT: 0.5)")
    return parser


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


def transformer_step(net, optimizer, scaler, images, targets, labels, args, rt):
    """One optimisation step against soft (mixed, smoothed) targets; returns its statistics."""
    with utils.autocast(rt):
        logits = net(utils.to_input(images, rt)).float()
    loss = soft_target_cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    # Against the unmixed labels: on mixed batches this understates what the network learned.
    return {"loss": loss.detach(), "acc": accuracy(logits, labels)}


def main(args):
    """Train one transformer on args.dataset; returns the results dict."""
    group = flags.check_args(args)
    if not models.is_transformer(group.names[0]):
        raise flags.UsageError(f"train_ceit.py trains transformers ({', '.join(sorted(models.TRANSFORMERS))}); "
                               f"use train.py for {group.names[0]}")
    if args.lr is None:  # DeiT's linear scaling rule: 5e-4 per 512 images
        args.lr = [5e-4 * args.batch_size / 512]
    rt = utils.setup_runtime(args)
    data, (train_loader, val_loader, test_loader) = utils.setup_data(args, rt)
    nets = utils.build_nets(group, data.info, rt, drop_path=args.drop_path)
    optimizers, peak_lrs = utils.build_optimizers(args, nets, rt)
    schedule = utils.Schedule(args, optimizers, peak_lrs, len(train_loader))
    scaler = utils.make_scaler(rt)
    mix_rng = HostRandom(args.seed)  # host-side draws of lam and boxes: no device synchronisation
    run = engine.start_run(args, "ceit", group, rt, data.info, nets, optimizers, steps_per_epoch=len(train_loader),
                           state={"scaler": scaler, "mix_rng": mix_rng})
    train_step = functools.partial(transformer_step, nets[0], optimizers[0], scaler, args=args, rt=rt)
    if rt.cuda_graphs:  # captured once, then replayed
        train_step = engine.capture_step(run, train_step)

    with engine.StopRequest(rt) as stop:
        for epoch in range(run.start_epoch, args.epochs):
            stats = engine.epoch_stats(run, epoch)  # on a mid-epoch resume: the epoch's statistics so far
            for step, (images, labels) in engine.batches(run, train_loader, epoch):
                schedule.step(epoch * len(train_loader) + step)
                # Mixup/cutmix draws happen on the host, outside the captured step.
                images, targets = mix_batch(images, labels, data.info.num_classes, args, mix_rng)
                stats.add(train_step(images, targets, labels))
                engine.log_step(run, epoch, step, stats)
                if stop.requested(step):  # SIGINT/SIGTERM: save last.pt and exit (130/143)
                    sys.exit(engine.save_and_stop(run, stop, epoch, step + 1, stats))
            evals = engine.evaluate_epoch(run, val_loader, test_loader, epoch)
            rows = engine.log_epoch(run, epoch, stats, evals, schedule)
            if engine.diverged(rows):  # NaN/inf: stop before saving anything of this epoch (exit 3)
                raise engine.divergence(run, epoch, stats, rows)
            run.checkpoints.save(epoch, evals)
            if stop.requested() and epoch + 1 < args.epochs:
                sys.exit(engine.save_and_stop(run, stop, epoch + 1, 0))
            if engine.stop_after(run, epoch):  # --stop-after N epochs in this invocation
                break
    return engine.finish(run)


if __name__ == "__main__":
    flags.launch(main, get_args_parser())
