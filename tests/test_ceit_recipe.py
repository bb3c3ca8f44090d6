"""train_ceit.py's half of CeiT's main.py recipe (github.com/coeusguo/ceit): RandAugment and random erasing
per image, DeiT's repeated augmentation (github.com/facebookresearch/deit samplers.py) across ranks, the
absolute final learning rate; their defaults, one-line errors and an exact mid-epoch resume."""
import importlib.util
import json
import os
import random
import re
import configs
import shlex
from collections import Counter

import pytest
import stopping
import torch
from PIL import Image

import flags
import train_ceit
import utils
from datasets import augment, build_data, make_loaders
from datasets.loaders import REPEATED_EPOCH_ROUND, _EpochSampler, _epoch_order, _SeededItems, repeated_epoch_length
from helpers import ROOT, read_rows, sigterm_after_step

TIMM = importlib.util.find_spec("timm") is not None
IMPLEMENTATIONS = [pytest.param("timm", marks=pytest.mark.skipif(not TIMM, reason="timm is not installed")), "torchvision"]
TINY = ["--model", "vit_tiny", "--dataset", "fake", "--eval-subset", "64", "--img-size", "16", "--train-subset", "256", "--val-size", "0",
        "--batch-size", "32", "--eval-batch-size", "256", "--device", "cpu", "--workers", "0", "--no-progress",
        "--log-interval", "0"]


def launch(capsys, argv, code):
    """Run train_ceit.py in-process as from a shell and expect exit `code` with one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        stopping.launch(train_ceit.main, train_ceit.get_args_parser(), [str(a) for a in argv])
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ---------------------------------------------------------------- RandAugment and random erasing, per image


def fake(**recipe):
    """The fake data set at 16 px with the recipe's per-image steps `recipe` (build_data's keywords)."""
    return build_data("fake", img_size=16, val_size=0, **recipe)


def images(data, keys):
    """The training images of (index, seed) keys, as the torch loader fetches them."""
    items = _SeededItems(data.train, host_random=augment.uses_host_random(data.info))
    return torch.stack([items[key][0] for key in keys])


def keys(seed, count=256, epoch=0):
    """The first (index, seed) keys of an epoch of the torch loader's training sampler."""
    sampler = _EpochSampler(2048, shuffle=True, seed=seed, rank=0, world_size=1, item_seeds=True)
    sampler.set_epoch(epoch)
    return list(sampler)[:count]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rand_augment_changes_images_and_is_a_function_of_the_item_seed(implementation):
    plain, augmented = fake(), fake(rand_augment=augment.RAND_AUGMENT_DEFAULT, rand_augment_impl=implementation)
    assert augmented.info.rand_augment_impl == implementation
    first = keys(seed=0)
    before, after = images(plain, first), images(augmented, first)
    # The crop and flip are drawn first, from the same seeds: what differs is RandAugment's work. timm
    # applies each of its 2 ops with probability 0.5 (some draws, such as a small shear, may leave a
    # 16-px image as it was); torchvision applies both.
    changed = (before != after).flatten(1).any(1).float().mean()
    assert changed > (0.5 if implementation == "timm" else 0.8)
    assert torch.equal(images(augmented, first), after)  # same seed, epoch and index: the same image
    other = images(augmented, [(index, seed + 1) for index, seed in first])
    assert (other != after).flatten(1).any(1).float().mean() > 0.5  # another seed: other images
    # the loader's main-process generators are left as they were
    state = torch.get_rng_state(), random.getstate()
    images(augmented, first[:4])
    assert torch.equal(torch.get_rng_state(), state[0]) and random.getstate() == state[1]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_recipes_batches_do_not_depend_on_the_worker_count(implementation):
    """RandAugment (timm's draws from Python's and NumPy's generators), erasing and repeated augmentation
    give the same batches with the images fetched in the main process or in 2 worker processes."""
    data = fake(rand_augment=augment.RAND_AUGMENT_DEFAULT, rand_augment_impl=implementation, erase_prob=0.25)
    batches = []
    for workers in (0, 2):
        train, _, _ = make_loaders(data, batch_size=64, device="cpu", workers=workers, seed=5, repeats=3)
        train.set_epoch(1)
        batches.append([batch for _, batch in zip(range(2), train)])
    for (a, labels_a), (b, labels_b) in zip(*batches):
        assert torch.equal(a, b) and torch.equal(labels_a, labels_b)


def test_random_erasing_erases_one_box_with_its_probability_after_normalisation():
    plain, erased = fake(), fake(erase_prob=0.25)
    first = keys(seed=0)
    before, after = images(plain, first), images(erased, first)
    changed = before != after
    share = changed.flatten(1).any(1).float().mean()
    assert 0.15 < share < 0.35  # p = 0.25 over 256 images
    for image in changed.flatten(1).any(1).nonzero().flatten().tolist():  # one box, every channel, at most 1/3
        pixels = changed[image].any(0)
        rows, cols = pixels.any(1).nonzero().flatten(), pixels.any(0).nonzero().flatten()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert changed[image][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert int(pixels.sum()) == height * width <= 16 * 16 / 3 + (height + width) / 2 + 1  # (rounded sides)
    always = images(fake(erase_prob=1.0), first)
    # per-pixel N(0, 1) values on the normalised image (timm's 'pixel' mode): far outside the pixels' range
    box = always != before
    assert box.flatten(1).any(1).all()
    values = always[box]
    assert abs(values.mean()) < 0.2 and 0.8 < values.std() < 1.2
    assert torch.equal(images(fake(erase_prob=1.0), first), always)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_channel_images_take_rand_augment(implementation):
    grey = Image.fromarray(torch.randint(256, (28, 28), dtype=torch.uint8).numpy())
    transform = augment.rand_augment(augment.RAND_AUGMENT_DEFAULT, implementation, img_size=28, mean=(0.286,))
    for seed in range(40):
        random.seed(seed)
        torch.manual_seed(seed)
        assert transform(grey).mode == "L"


@pytest.mark.skipif(not TIMM, reason="timm is not installed")
def test_timms_posterize_to_zero_bits_is_a_black_image():
    """At magnitude 10 timm's increasing posterize keeps 0 bits, which Pillow 13 refuses: here a black image."""
    image = Image.fromarray(torch.randint(1, 256, (8, 8, 3), dtype=torch.uint8).numpy())
    transform = augment.rand_augment("rand-m10-inc1", "timm", img_size=8, mean=(0.5, 0.5, 0.5))
    posterize = next(op for op in transform.ops if op.name == "PosterizeIncreasing")
    posterize.prob = 1.0
    assert posterize(image).getextrema() == ((0, 0),) * 3
    assert augment.posterize(image, 8) is image and augment.posterize(image, 1).getextrema()[0][1] == 128


def test_parse_rand_augment():
    default = augment.parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert default == augment.RandAugmentConfig(magnitude=9, num_ops=2, prob=0.5, magnitude_std=0.5, increasing=True)
    assert augment.parse_rand_augment("rand") == augment.RandAugmentConfig()  # timm's defaults: m10, n2, p0.5
    assert augment.parse_rand_augment("rand-n3-m5-p1").num_ops == 3
    assert augment.parse_rand_augment("none") is None
    for bad in ("rand-m11", "rand-n0", "augmix-m9", "rand-x3", "rand-m9-m8", "rand-mstd-1", "rand-inc2", "rand-tweights",
                "rand-p1.5", "rand-m9.5", ""):
        with pytest.raises(ValueError, match="--rand-augment"):
            augment.parse_rand_augment(bad)


# ---------------------------------------------------------------- repeated augmentation (DeiT's RASampler)


def deit_epoch(order, repeats, rank, world_size):
    """DeiT's RASampler as its samplers.py describes it, written out for a given shuffled `order`: every
    index `repeats` times in a row, padded with the sequence's start to a multiple of world_size, every
    world_size-th entry from `rank`, and the first floor(N // 256 * 256 / world_size) of those."""
    size = len(order)
    per_rank = -(-size * repeats // world_size)
    sequence = [index for index in order for _ in range(repeats)]
    sequence += sequence[:per_rank * world_size - len(sequence)]
    return sequence[rank::world_size][:size // 256 * 256 // world_size]


def rank_epochs(size, world_size, repeats=3, seed=0, epoch=0):
    """Each rank's (index, seed) keys of one epoch of repeated augmentation."""
    samplers = [_EpochSampler(size, shuffle=True, seed=seed, rank=rank, world_size=world_size, item_seeds=True,
                              repeats=repeats) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_repeated_augmentation_draws_each_index_three_times_across_ranks(world_size):
    size = 768  # 768 // 256 * 256 = 768 images per epoch: 256 indices, 3 copies each
    epochs = rank_epochs(size, world_size)
    assert [len(keys) for keys in epochs] == [size // world_size] * world_size  # equal shares: steps in lockstep
    assert all(len(keys) == len(sampler) for keys, sampler in zip(epochs, [
        _EpochSampler(size, shuffle=True, seed=0, rank=r, world_size=world_size, item_seeds=True, repeats=3)
        for r in range(world_size)]))
    everything = [key for keys in epochs for key in keys]
    counts = Counter(index for index, _ in everything)
    assert len(counts) == size // 3 and set(counts.values()) == {3}
    # each copy is augmented differently: three seeds per index
    seeds = {}
    for index, seed in everything:
        seeds.setdefault(index, set()).add(seed)
    assert all(len(s) == 3 for s in seeds.values())
    # DeiT's exact order, given the same shuffle
    order = _epoch_order(size, 0, 0).tolist()
    assert [[index for index, _ in keys] for keys in epochs] == [deit_epoch(order, 3, r, world_size)
                                                                 for r in range(world_size)]
    if world_size >= 3:  # the copies of an index are dealt to different processes, at the same step
        where = {}
        for rank, keys in enumerate(epochs):
            for step, (index, _) in enumerate(keys):
                where.setdefault(index, []).append((rank, step))
        assert all(len({rank for rank, _ in places}) == 3 and len({step for _, step in places}) <= 2
                   for places in where.values())


@pytest.mark.parametrize("size,world_size", [(1000, 1), (1000, 3), (2048, 2), (100, 2), (7, 2)])
def test_repeated_augmentation_keeps_deits_epoch_length(size, world_size):
    """About the data set's size per epoch in all, rounded down to a multiple of 256 (a set under 256
    images, which that rounding would leave empty, keeps N // world_size per rank)."""
    epochs = rank_epochs(size, world_size)
    rounded = size // REPEATED_EPOCH_ROUND * REPEATED_EPOCH_ROUND if size >= REPEATED_EPOCH_ROUND else size
    assert [len(keys) for keys in epochs] == [rounded // world_size] * world_size
    assert repeated_epoch_length(size, world_size) == rounded // world_size
    counts = Counter(index for keys in epochs for index, _ in keys)
    # every index drawn is drawn 3 times, except the last one, which the epoch's end may cut
    assert sorted(counts.values())[1:] == [3] * (len(counts) - 1)
    if size >= REPEATED_EPOCH_ROUND:
        order = _epoch_order(size, 0, 0).tolist()
        assert [[i for i, _ in keys] for keys in epochs] == [deit_epoch(order, 3, r, world_size) for r in range(world_size)]


def test_repeated_augmentation_is_a_pure_function_of_seed_and_epoch():
    first, again = rank_epochs(768, 2, epoch=1), rank_epochs(768, 2, epoch=1)
    assert first == again  # a resumed epoch replays the same indices and augmentation seeds
    other_epoch, other_seed = rank_epochs(768, 2, epoch=2), rank_epochs(768, 2, seed=1, epoch=1)
    for other in (other_epoch, other_seed):
        assert {i for keys in other for i, _ in keys} != {i for keys in first for i, _ in keys}
    # an image's augmentation seed depends on its index and copy, not on how many processes share the epoch
    one, two, four = (Counter(key for keys in rank_epochs(768, world) for key in keys) for world in (1, 2, 4))
    assert one == two == four


def test_repeated_augmentation_batches_on_the_torch_loader_only():
    data = fake(erase_prob=0.25)
    train, _, _ = make_loaders(data, batch_size=32, loader="auto", device="cpu", workers=0, repeats=3)
    assert type(train).__name__ == "TorchLoader" and len(train) == 2048 // 32
    assert type(make_loaders(fake(), batch_size=32, device="cpu", workers=0)[0]).__name__ == "GpuLoader"
    with pytest.raises(Exception, match="--loader gpu cannot apply random erasing and repeated augmentation"):
        make_loaders(data, batch_size=32, loader="gpu", device="cpu", workers=0, repeats=3)


# ---------------------------------------------------------------- the final learning rate


def test_the_final_rate_is_absolute_unless_a_fraction_is_given():
    parser = train_ceit.get_args_parser()
    args = parser.parse_args([])
    assert args.min_lr is None and args.absolute_min_lr == 1e-5
    # peak 5e-4 x 96 / 512 = 9.375e-5 in one process; with 4 processes (linear scaling) four times that
    assert train_ceit.min_lr_fraction(args, 9.375e-5) == pytest.approx(1e-5 / 9.375e-5)
    assert train_ceit.min_lr_fraction(args, 4 * 9.375e-5) == pytest.approx(1e-5 / 3.75e-4)
    assert train_ceit.min_lr_fraction(args, 5e-6) == 1.0  # never above the peak
    given = parser.parse_args(["--min-lr", "0.1"])
    train_ceit.check_recipe(given)
    assert train_ceit.min_lr_fraction(given, 9.375e-5) == 0.1
    # --absolute-min-lr given over a --config run's --min-lr: the rate stands (the flags stay as parsed)
    parser.set_defaults(min_lr=0.1)  # what --config of a run with --min-lr 0.1 does
    over = parser.parse_args(["--absolute-min-lr", "2e-5"])
    train_ceit.check_recipe(over)
    assert over.min_lr == 0.1 and train_ceit.min_lr_fraction(over, 4e-5) == pytest.approx(0.5)


# ---------------------------------------------------------------- the script: defaults, errors, exact resume


def test_a_two_epoch_run_takes_the_recipe_by_default_and_resumes_exactly(capsys, tmp_path):
    argv = [*TINY, "--train-subset", "128", "--epochs", "2", "--warmup-epochs", "0.5", "--deterministic"]  # 4 steps an epoch
    train_ceit.main(train_ceit.get_args_parser().parse_args([*argv, "--out-dir", str(tmp_path / "straight")]))
    out = capsys.readouterr().out
    recipe = next(line for line in out.splitlines() if line.startswith("recipe: "))
    implementation = "timm's rand_augment_transform" if TIMM else "torchvision's v2.RandAugment"
    assert f"RandAugment {'rand-m9-mstd0.5-inc1' if TIMM else '2 ops at magnitude 9/10'} ({implementation}" in recipe
    assert "random erasing p 0.25" in recipe and "repeated augmentation x3" in recipe and "torch loader" in recipe
    assert "128 images per process and epoch of 128" in recipe and "min lr 1e-05" in recipe
    recorded = json.loads((tmp_path / "straight" / "args.json").read_text())
    assert recorded["rand_augment"] == "rand-m9-mstd0.5-inc1" and recorded["rand_augment_impl"] == "auto"  # as given
    assert recorded["resolved"]["rand_augment_impl"] == ("timm" if TIMM else "torchvision")  # the library that ran
    assert recorded["reprob"] == 0.25 and recorded["repeated_aug"] and recorded["aug_repeats"] == 3
    assert recorded["absolute_min_lr"] == 1e-5 and recorded["min_lr"] is None
    # the rate of the last step: the cosine from the peak 5e-4 x 32 / 512 down to 1e-5 itself
    peak, steps = 5e-4 * 32 / 512, 128 // 32
    last = peak * utils.lr_factor(2 * steps - 1, total_steps=2 * steps, warmup_steps=steps // 2, schedule="cosine",
                                  min_lr=1e-5 / peak)
    straight = read_rows(tmp_path / "straight")
    assert float(straight[1]["lr"]) == pytest.approx(last, rel=1e-4) and 1e-5 < last < 1.2e-5  # (5 digits in the csv)

    with sigterm_after_step(steps + 3), pytest.raises(SystemExit) as stopped:  # after step 3 of epoch 2
        train_ceit.main(train_ceit.get_args_parser().parse_args([*argv, "--out-dir", str(tmp_path / "resumed")]))
    assert stopped.value.code == 143
    train_ceit.main(train_ceit.get_args_parser().parse_args([*argv, "--out-dir", str(tmp_path / "resumed"),
                                                             "--resume", "auto"]))
    resumed = read_rows(tmp_path / "resumed")
    keys = [k for k in straight[0] if k not in ("epoch_time_s", "images_per_s")]
    assert [[r[k] for k in keys] for r in straight] == [[r[k] for k in keys] for r in resumed]


def test_a_run_recorded_before_the_recipe_flags_resumes_and_repeats_without_them(tmp_path):
    """A run of the earlier train_ceit.py trained without RandAugment, erasing and repeated augmentation, to a
    final fraction --min-lr (0): its resume continues it so, and so does a --config repeat."""
    off = ["--rand-augment", "none", "--reprob", "0", "--no-repeated-aug", "--min-lr", "0"]
    train_ceit.main(train_ceit.get_args_parser().parse_args([*TINY, "--train-subset", "64", "--epochs", "1", *off,
                                                             "--out-dir", str(tmp_path)]))
    newer = ("rand_augment", "rand_augment_impl", "reprob", "repeated_aug", "aug_repeats", "absolute_min_lr")
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["args"] = {key: value for key, value in ckpt["args"].items() if key not in newer}
    torch.save(ckpt, tmp_path / "last.pt")
    recorded = {key: value for key, value in json.loads((tmp_path / "args.json").read_text()).items() if key not in newer}
    (tmp_path / "args.json").write_text(json.dumps(recorded))
    parser = train_ceit.get_args_parser()
    resumed = configs.parse_args(parser, [*TINY, "--train-subset", "64", "--epochs", "2", "--out-dir", str(tmp_path),
                                          "--resume", "auto"])
    flags.check_args(resumed)
    train_ceit.check_recipe(resumed)
    repeat = configs.parse_args(train_ceit.get_args_parser(), ["--config", str(tmp_path / "args.json")])
    for args in (resumed, repeat):
        assert (args.rand_augment, args.reprob, args.repeated_aug, args.min_lr) == ("none", 0.0, False, 0.0)
    # a new run takes the recipe
    assert train_ceit.get_args_parser().parse_args([]).rand_augment == augment.RAND_AUGMENT_DEFAULT


@pytest.mark.parametrize("extra,fragment", [
    (["--rand-augment", "rand-m12"], "--rand-augment 'rand-m12': the magnitude m must be in 0..10"),
    (["--rand-augment", "autoaugment"], "give 'none' or timm's syntax"),
    (["--reprob", "1.5"], "--reprob must be in [0, 1]"),
    (["--reprob", "nan"], "--reprob must be a finite number"),
    (["--aug-repeats", "0"], "--aug-repeats must be a positive integer"),
    (["--absolute-min-lr=-1e-5"], "--absolute-min-lr must be >= 0"),
    (["--min-lr", "0.1", "--absolute-min-lr", "1e-6"], "give --min-lr (a fraction of the peak) or --absolute-min-lr"),
    (["--loader", "gpu"], "--loader gpu cannot apply RandAugment and random erasing and repeated augmentation"),
    (["--loader", "gpu", "--rand-augment", "none", "--reprob", "0"], "--loader gpu cannot apply repeated augmentation"),
])
def test_bad_recipe_values_are_one_line_errors(capsys, tmp_path, extra, fragment):
    err = launch(capsys, [*TINY, *extra, "--out-dir", tmp_path], code=2)
    assert fragment in err
    assert not tmp_path.exists() or not os.listdir(tmp_path)  # refused before anything was written


def test_rand_augment_impl_timm_without_timm_is_one_line(capsys, monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    err = launch(capsys, [*TINY, "--rand-augment-impl", "timm", "--out-dir", tmp_path], code=2)
    assert "needs timm (pip install timm)" in err
    assert augment.resolve_implementation("auto") == "torchvision"


# ---------------------------------------------------------------- the documented commands


def documented(path, marker):
    """The argv of the train_ceit.py command on the line of `path` that holds `marker`."""
    text = open(os.path.join(ROOT, path)).read()
    line = next(line for line in text.split("\n\n") if marker in line)
    command = re.search(r"`python train_ceit\.py ([^`]+)`", line).group(1)
    return train_ceit.get_args_parser().parse_args(shlex.split(command))


def test_the_authors_ceit_command_is_their_recipe():
    """Their train_ceit.py (github.com/XiaoleiDiao/Competitive-Distillation @298039f): CeiT(224, 4, 100) on
    CIFAR-100 resized to 224, flipped and rotated by 15; mixup Beta(1, 1) on every batch, plain cross-entropy,
    AdamW 1e-3 with weight decay 1e-8 on every parameter at a constant rate (their plateau scheduler never
    fired), 200 epochs of batch 96, no drop path, none of DeiT's per-image augmentation."""
    args = documented("docs/authors.md", "Their CeiT script")
    assert (args.model, args.dataset, args.img_size, args.crop, args.rotate) == ("ceit", "cifar100", 224, False, 15)
    assert (args.mixup, args.cutmix, args.mix_prob, args.label_smoothing) == (1.0, 0.0, 1.0, 0.0)
    assert (args.optimizer, args.lr, args.weight_decay, args.decay_norm_and_bias) == (["adamw"], [1e-3], [1e-8], True)
    assert (args.schedule, args.warmup_epochs, args.epochs, args.batch_size, args.drop_path) == ("constant", 0, 200, 96, 0)
    assert (args.rand_augment, args.reprob, args.repeated_aug) == ("none", 0, False)
