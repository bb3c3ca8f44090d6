"""Load trained networks, show and save their predictions.

Every network of the given checkpoints forms one group; each network and the group's ensemble
(averaged softmax) are evaluated on the dataset's test set, a grid of test images with every
network's prediction is saved as a PNG, and the run's training curves are plotted from
metrics.csv (when matplotlib is installed). With --images, the user's own image files are
classified instead (no dataset needed).

    python demo.py runs/competitive-cifar100-resnet32-resnet32-20250101-120000
    python demo.py runs/baseline/last.pt runs/other-baseline/last.pt --num-images 25
    python demo.py runs/my-run --images cat.jpg dog.png --topk 5
"""
import argparse
import dataclasses
import math
import os
import warnings

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms

import checkpoints
import engine
import flags
import metrics
import models
import stopping
import utils
from datasets import build_data, data_from_arrays, make_loaders
from errors import UsageError
from models.weights import net_labels

RIGHT, WRONG, TEXT = (0, 130, 0), (200, 0, 0), (0, 0, 0)
TILE_SIDE = 128  # displayed image size in the grid: 32-px images become visible, 224-px ones fit


def get_args_parser():
    """Flags: what to load, what to show and where to write it."""
    parser = argparse.ArgumentParser(description="Load trained networks, show and save their predictions.",
                                     formatter_class=flags.HelpFormatter)
    add = parser.add_argument
    add("checkpoints", nargs="+", metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run directory (its checkpoint chosen by --which) or checkpoint files; all their networks form one group")
    add("--which", default="best", choices=["best", "last"],
        help="checkpoint of a run directory: best.pt (each network at its best validation accuracy; "
             "last.pt when the run had no validation split) or last.pt")
    add("--ema", action="store_true",
        help="show the networks' --model-ema averages saved in the checkpoint instead of the networks")
    add("--images", nargs="+", metavar="FILE", default=None,
        help="classify these image files instead of test images (skips the test-set evaluation)")
    add("--topk", type=int, default=3, help="classes shown per network for --images")
    add("--num-images", type=int, default=16, help="test images in the prediction grid")
    add("--seed", type=int, default=0, help="seed of the test-image selection")
    add("--out", default=None, help="prediction grid PNG (default: <run_dir>/predictions.png)")
    add("--curves", default=None, help="training-curve PNG from metrics.csv (default: <run_dir>/curves.png)")
    add("--data-dir", default=None, help="where the dataset is (default: the training run's --data-dir)")
    add("--download", action=argparse.BooleanOptionalAction, default=None,
        help="download a missing dataset (default: as the training run did)")
    add("--batch-size", type=int, default=256, help="evaluation batch size")
    add("--workers", type=int, default=None,
        help="DataLoader worker processes (image-folder datasets; default: min(8, CPUs) on CUDA, 2 on the CPU)")
    add("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    return parser


def check_args(args):
    """Reject flag values that cannot work, with one line saying what is accepted."""
    for name in ("topk", "num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")


# ----------------------------------------------------------------------------------------------
# Checkpoints and the group
# ----------------------------------------------------------------------------------------------
def resolve_checkpoint(path, which):
    """(checkpoint file, run directory) for a run directory or a checkpoint file."""
    if os.path.isdir(path):
        names = ["best.pt", "last.pt"] if which == "best" else ["last.pt"]
        for name in names:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name), path
        raise UsageError(f"'{path}' holds no {' or '.join(names)}: not a run directory of this repository's scripts")
    if not os.path.exists(path):
        raise UsageError(f"'{path}' does not exist")
    return path, os.path.dirname(os.path.abspath(path))


def describe(ckpt):
    """The task of a checkpoint in words: dataset, classes and input geometry."""
    return f"{ckpt['dataset']} ({ckpt['num_classes']} classes, {ckpt['in_chans']}x{ckpt['img_size']}px)"


def check_group(paths, ckpts):
    """Refuse checkpoints trained for different tasks: their networks cannot form one group."""
    keys = ("dataset", "num_classes", "img_size", "in_chans", "classes")
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        if any(ckpt[k] != ckpts[0][k] for k in keys):
            detail = " with other class names" if describe(ckpt) == describe(ckpts[0]) else ""
            raise UsageError(f"'{path}' was trained on {describe(ckpt)} but '{paths[0]}' on "
                                   f"{describe(ckpts[0])}{detail}; a group must share dataset, classes and input size")


def net_epochs(ckpt):
    """Per network, the training it had when saved: '12', or '12+40 steps' for a mid-epoch stop."""
    best = ckpt["state"].get("best")
    # best.pt (the only checkpoint without optimizer state) holds each network at its own best epoch.
    if not ckpt["optimizers"] and best is not None:
        return [str(epoch) for epoch in best["epoch"]]
    step = f"+{ckpt['step']} steps" if ckpt["step"] else ""
    return [f"{ckpt['epoch']}{step}"] * len(ckpt["nets"])


def with_averages(path, ckpt):
    """The checkpoint with its networks' --model-ema averages in place of the networks (a frozen
    network, which has none, stays itself)."""
    averages = ckpt["state"].get("ema", {}).get("averages")
    if not averages:
        raise UsageError(f"'{path}' holds no --model-ema averages: the run was trained without --model-ema")
    prefix = "module."  # an AveragedModel's state: its module's tensors, and its update count
    nets = [state if average is None else {k[len(prefix):]: v for k, v in average.items() if k.startswith(prefix)}
            for state, average in zip(ckpt["nets"], averages)]
    return {**ckpt, "nets": nets}


def build_group(paths, ckpts, device):
    """Rebuild every checkpoint's networks by name, load their weights, eval mode on `device`."""
    nets = []
    for path, ckpt in zip(paths, ckpts):
        for i, (name, state) in enumerate(zip(ckpt["models"], ckpt["nets"])):
            try:
                net = models.create_model(name, num_classes=ckpt["num_classes"], img_size=ckpt["img_size"],
                                          in_chans=ckpt["in_chans"])
                net.load_state_dict(state)
            except (ValueError, RuntimeError) as error:
                # a renamed model or changed architecture since training: say which network, briefly
                raise UsageError(f"'{path}' network {i} ({name}) cannot be rebuilt: "
                                       f"{str(error).splitlines()[0][:160]}") from None
            nets.append(net.to(device).eval())
    return nets


@torch.no_grad()
def predict(nets, images, batch_size):
    """Softmax probabilities (n, B, C) of each network, plus the ensemble's when n >= 2."""
    for net in nets:
        net.eval()  # predictions use the running BatchNorm statistics, whatever mode a caller left
    probs = torch.cat([torch.stack([net(batch).float().softmax(-1) for net in nets])
                       for batch in images.split(batch_size)], dim=1)
    return torch.cat([probs, probs.mean(0, keepdim=True)]) if len(nets) > 1 else probs


# ----------------------------------------------------------------------------------------------
# The test set and the user's images
# ----------------------------------------------------------------------------------------------
def load_test_data(ckpt, args):
    """The dataset the checkpoint was trained on, rebuilt from its stored flags."""
    train_args = ckpt["args"]
    download = train_args.get("download", True) if args.download is None else args.download
    data_dir = args.data_dir or train_args.get("data_dir", "./data")
    data = build_data(ckpt["dataset"], data_dir, img_size=ckpt["img_size"], val_size=train_args.get("val_size"),
                      split_seed=train_args.get("split_seed", 0), download=download,
                      num_classes=train_args.get("num_classes"))
    if list(data.info.classes) != list(ckpt["classes"]):
        raise UsageError(f"the {ckpt['dataset']} classes found in '{data_dir}' are not the {ckpt['num_classes']} "
                               "the checkpoint was trained on; point --data-dir at the training data")
    stored = dataclasses.replace(data.info, mean=tuple(ckpt["mean"]), std=tuple(ckpt["std"]))
    if stored != data.info:
        # The networks learnt on the stored normalisation; the dataset code may have changed since.
        if data.arrays is None:
            print(f"warning: {ckpt['dataset']} is now normalised with mean {data.info.mean} std {data.info.std}, "
                  f"the networks were trained with {stored.mean} {stored.std}")
        else:
            data = data_from_arrays(stored, dict(data.arrays))
    return data


def load_images(paths, ckpt):
    """User image files as the networks expect them: (normalised batch, displayable PIL images)."""
    mode = {1: "L", 3: "RGB"}.get(ckpt["in_chans"])
    if mode is None:
        raise UsageError(f"--images needs networks with 1 or 3 input channels, these have {ckpt['in_chans']}")
    # Resize the short side and crop the centre: keeps the aspect ratio, like the eval transform.
    geometry = transforms.Compose([transforms.Resize(ckpt["img_size"]), transforms.CenterCrop(ckpt["img_size"])])
    finish = transforms.Compose([transforms.ToTensor(), transforms.Normalize(ckpt["mean"], ckpt["std"])])
    shown, tensors = [], []
    for path in paths:
        if not os.path.isfile(path):
            what = ("does not exist" if not os.path.exists(path) else "is a directory" if os.path.isdir(path)
                    else "is not a regular file (a pipe or a device)")
            raise UsageError(f"image '{path}' {what}; --images takes image files")
        try:
            with warnings.catch_warnings():  # an image of more pixels than PIL's bomb limit: an error, not a warning
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image = geometry(image.convert(mode))
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise UsageError(f"'{path}' is not a readable image ({' '.join(str(error).split())[:120]})") from None
        shown.append(image)
        tensors.append(finish(image))
    return torch.stack(tensors), shown


def to_pil(image, mean, std):
    """A normalised (C, H, W) tensor back to a PIL image in pixel space."""
    mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    pixels = (image.cpu().float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy())


# ----------------------------------------------------------------------------------------------
# Console table and the PNG grid
# ----------------------------------------------------------------------------------------------
def print_table(rows):
    """Print rows of (network, model, epoch, top-1, top-5, loss) as an aligned table."""
    header = ("network", "model", "epoch", "test top-1", "top-5", "loss")
    cells = [header] + [(label, model, epoch, f"{top1:.2f}%", f"{top5:.2f}%", f"{loss:.4f}")
                        for label, model, epoch, top1, top5, loss in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    for row in cells:
        print("  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths))))


def default_font():
    """PIL's built-in font, at a readable size where this Pillow allows it (no font file needed)."""
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def displayed(image):
    """The image at about TILE_SIDE px: whole-pixel upscaling keeps small images crisp."""
    side = image.width * max(1, TILE_SIDE // image.width) if image.width <= TILE_SIDE else TILE_SIDE
    resample = Image.NEAREST if side >= image.width else Image.BILINEAR
    return image.convert("RGB").resize((side, side * image.height // image.width), resample)


def draw_grid(tiles, title, path):
    """Save tiles of (PIL image, [(text, colour), ...]) as a near-square grid PNG under a title line."""
    font = default_font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    pad = 8
    tiles = [(displayed(image), lines) for image, lines in tiles]
    tile_w = max(max([image.width] + [probe.textlength(text, font=font) for text, _ in lines]) for image, lines in tiles)
    tile_w = math.ceil(tile_w) + 2 * pad
    tile_h = max(image.height + 4 + len(lines) * line for image, lines in tiles) + 2 * pad
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    width = max(cols * tile_w, math.ceil(probe.textlength(title, font=font)) + 2 * pad)
    canvas = Image.new("RGB", (width, line + pad + rows * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad // 2), title, fill=TEXT, font=font)
    for k, (image, lines) in enumerate(tiles):
        x, y = (k % cols) * tile_w + pad, line + pad + (k // cols) * tile_h + pad
        canvas.paste(image, (x, y))
        for j, (text, colour) in enumerate(lines):
            draw.text((x, y + image.height + 4 + j * line), text, fill=colour, font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def short(name, length=24):
    """A class name cut to fit a tile."""
    return name if len(name) <= length else name[:length - 1] + "~"


# ----------------------------------------------------------------------------------------------
# Training curves from metrics.csv
# ----------------------------------------------------------------------------------------------
def teacher_matrix(series):
    """(network labels, matrix) with matrix[i][j] the share of training steps in which network j taught
    network i, averaged over the run's epochs; None for a run without the competitive script's columns."""
    nets = [net for net in series if net != "ensemble"]
    keys = [f"train_taught_by_net{j}" for j in range(len(nets))]
    if not nets or not all(key in series[net] for net in nets for key in keys):
        return None
    return nets, [[sum(v for _, v in series[net][key]) / len(series[net][key]) for key in keys] for net in nets]


def draw_teacher_matrix(ax, nets, matrix):
    """The teacher matrix as a heat map with its values written in."""
    ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value > 0.6 else "black")
    ax.set_xticks(range(len(nets)), nets, rotation=20, fontsize="small")
    ax.set_yticks(range(len(nets)), nets, fontsize="small")
    ax.set(xlabel="teacher", ylabel="learner", title="share of steps in which j taught i (run mean)")


def plot_curves(runs, path):
    """Plot each run's per-network validation accuracy (and leader share) over epochs to `path`.

    runs: {run directory: metrics.read_metrics(...)}. Returns False when matplotlib is not installed.
    """
    try:
        import matplotlib  # noqa: F401  (optional; imported first so a blocked or broken install is caught)
        from matplotlib.figure import Figure  # needs no GUI backend, unlike pyplot
    except ImportError:
        return False
    leaders = any("train_leader_share" in columns for series in runs.values() for columns in series.values())
    matrix = next(filter(None, (teacher_matrix(series) for series in runs.values())), None)
    panels = 1 + leaders + (matrix is not None)
    fig = Figure(figsize=(6.5 * panels, 4.5), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    only_val = True
    for run, series in runs.items():
        # Accuracy on the validation split when the run had one; the test set otherwise.
        metric = "val_acc" if any("val_acc" in c for c in series.values()) else "test_acc"
        only_val &= metric == "val_acc"
        prefix = f"{os.path.basename(run)}: " if len(runs) > 1 else ""
        suffix = "" if metric == "val_acc" else " (test)"
        for net, columns in series.items():
            style = "--" if net == "ensemble" else "-"
            if metric in columns:
                epochs, values = zip(*columns[metric])
                axes[0].plot(epochs, values, style, marker=".", label=prefix + net + suffix)
            if leaders and "train_leader_share" in columns:
                epochs, values = zip(*columns["train_leader_share"])
                axes[1].plot(epochs, values, style, marker=".", label=prefix + net)
    axes[0].set(xlabel="epoch", ylabel="validation accuracy (%)" if only_val else "accuracy (%)",
                title="accuracy over training")
    if leaders:
        axes[1].set(xlabel="epoch", ylabel="share of steps as leader", ylim=(-0.02, 1.02),
                    title="competition: who leads")
    for ax in axes[:1 + leaders]:
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if matrix is not None:
        draw_teacher_matrix(axes[-1], *matrix)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------
def show_test_set(nets, labels, names, epochs, ckpt, args, rt, out):
    """Evaluate the group on the test set, print the table and draw the test-image grid."""
    data = load_test_data(ckpt, args)
    info = data.info
    _, _, test_loader = make_loaders(data, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                                     device=rt.device, workers=utils.resolve_workers(args.workers, rt.device), seed=args.seed)
    synthetic = " (SYNTHETIC data: numbers mean nothing)" if info.synthetic else ""
    print(f"test set of {info.name}: {info.test_size} images{synthetic}")
    results = engine.evaluate(nets, test_loader, rt)
    group = [("ensemble", "+".join(names), epochs[0] if len(set(epochs)) == 1 else "mixed")] if len(nets) > 1 else []
    rows = [(label, model, epoch, r["acc"], r["top5"], r["loss"])
            for (label, model, epoch), r in zip(list(zip(labels, names, epochs)) + group, results)]
    print_table(rows)

    count = min(args.num_images, info.test_size)
    chosen = torch.randperm(info.test_size, generator=torch.Generator().manual_seed(args.seed))[:count].tolist()
    samples = [data.test[i] for i in chosen]
    images = torch.stack([image for image, _ in samples])
    probs = predict(nets, images.to(rt.device), args.batch_size).cpu()
    tiles = []
    for k, (image, truth) in enumerate(samples):
        lines = [(f"true: {short(info.classes[truth])}", TEXT)]
        for label, p in zip(labels + ["ensemble"], probs[:, k]):
            guess = int(p.argmax())
            lines.append((f"{label}: {short(info.classes[guess])} {100 * p[guess]:.0f}%",
                          RIGHT if guess == truth else WRONG))
        tiles.append((to_pil(image, info.mean, info.std), lines))
    draw_grid(tiles, f"{info.name} test images (seed {args.seed}): green = right, red = wrong", out)
    print(f"wrote {out} ({count} test images)")


def show_user_images(nets, labels, ckpt, args, rt, out, batch, shown):
    """Print and draw every network's top-k classes for the user's image files."""
    probs = predict(nets, batch.to(rt.device), args.batch_size).cpu()
    k = min(args.topk, ckpt["num_classes"])
    width = max(len(label) for label in labels + ["ensemble"])
    tiles = []
    for i, path in enumerate(args.images):
        print(path)
        lines = [(short(os.path.basename(path), 32), TEXT)]
        for label, p in zip(labels + ["ensemble"], probs[:, i]):
            top = p.topk(k)
            guesses = [f"{ckpt['classes'][c]} {100 * v:.1f}%" for v, c in zip(top.values.tolist(), top.indices.tolist())]
            print(f"  {label:<{width}}  " + "  ".join(guesses))
            lines.append((f"{label}:", TEXT))
            lines += [(f"  {short(g, 32)}", TEXT) for g in guesses]
        tiles.append((shown[i], lines))
    draw_grid(tiles, f"top-{k} predictions ({ckpt['dataset']} classes)", out)
    print(f"wrote {out} ({len(args.images)} images)")


# What --out (PIL) and --curves (matplotlib) can write, by the file's ending
GRID_FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CURVE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def main(args):
    """Load the group, show its test-set results (or classify --images), save the grid and curves."""
    check_args(args)
    device = utils.resolve_device(args.device)
    sources = [resolve_checkpoint(path, args.which) for path in args.checkpoints]
    paths = [path for path, _ in sources]
    ckpts = [checkpoints.load_checkpoint(path) for path in paths]
    check_group(paths, ckpts)
    if args.ema:
        ckpts = [with_averages(path, c) for path, c in zip(paths, ckpts)]
    ckpt = ckpts[0]
    run_dir = sources[0][1]
    out = args.out or os.path.join(run_dir, "predictions.png")
    for path, flag, kinds in ((out, "--out", GRID_FORMATS), (args.curves or os.path.join(run_dir, "curves.png"), "--curves",
                                                           CURVE_FORMATS)):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.access(folder, os.W_OK):  # fail before the evaluation, not after it
            raise UsageError(f"cannot write '{path}': '{folder}' is not writable; write elsewhere with {flag} FILE")
        if os.path.splitext(path)[1].lower() not in kinds:
            raise UsageError(f"{flag} '{path}': the file's ending names no image format it can be written in; "
                             f"give one of {', '.join(kinds)}")
    batch, shown = load_images(args.images, ckpt) if args.images else (None, None)  # fail before heavy work
    names = [name for c in ckpts for name in c["models"]]
    labels = net_labels(names)  # numbered across checkpoints, so two runs' net0 stay apart
    epochs = [epoch for c in ckpts for epoch in net_epochs(c)]
    start = 0
    for path, c in zip(paths, ckpts):
        print(f"{path}: {', '.join(labels[start:start + len(c['nets'])])} trained on {describe(c)}, "
              f"epoch {', '.join(dict.fromkeys(epochs[start:start + len(c['nets'])]))}")
        start += len(c["nets"])
    nets = build_group(paths, ckpts, device)
    rt = utils.Runtime(device, None, False)
    if args.images:
        show_user_images(nets, labels, ckpt, args, rt, out, batch, shown)
    else:
        show_test_set(nets, labels, names, epochs, ckpt, args, rt, out)

    runs = {}
    for _, directory in sources:
        directory = os.path.abspath(directory)
        try:
            series = metrics.read_metrics(directory)
        except ValueError as error:
            print(f"training-curve plot skipped: {error}")
            continue
        if directory not in runs and series:
            runs[directory] = series
    if runs:  # checkpoint files kept outside a run directory have no metrics to plot
        curves = args.curves or os.path.join(run_dir, "curves.png")
        if plot_curves(runs, curves):
            print(f"wrote {curves} (training curves)")
        else:
            print("training-curve plot skipped: matplotlib is not installed (pip install matplotlib enables it)")


if __name__ == "__main__":
    stopping.launch(main, get_args_parser())
