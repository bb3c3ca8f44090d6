"""Tests for perturb.py: the stochastic perturbation (paper section 3.2) (CPU, a few seconds)."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

import checkpoints
import lifecycle
from losses import mixed_cross_entropy
from helpers import DEVICES
from perturb import PERTURBATIONS, Perturber, bn_statistics_kept, perturb

RANDOM_OPS = tuple(op for op in PERTURBATIONS if op not in ("hflip", "vflip"))  # the ops that draw random numbers
STATS = {1: ((0.2860,), (0.3530,)),                                  # Fashion-MNIST
         3: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}    # CIFAR-10
# Rounding of a normalised bf16 value (|x| < 3, 8-bit mantissa) seen in pixel units (std < 0.36).
PIXEL_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def normalise(pixels, channels, dtype=torch.float32):
    """Pixel-space float32 batch -> normalised batch in `dtype`."""
    mean, std = (torch.tensor(s).view(-1, 1, 1) for s in STATS[channels])
    return ((pixels - mean) / std).to(dtype)


def to_pixels(images, channels):
    """Normalised batch -> float32 pixel space."""
    mean, std = (torch.tensor(s).view(-1, 1, 1) for s in STATS[channels])
    return images.float() * std + mean


def run(op, images, labels, channels, seed=0):
    mean, std = STATS[channels]
    return perturb(images, labels, op, mean=mean, std=std, generator=torch.Generator().manual_seed(seed))


def batch(channels, dtype=torch.float32, size=(8, 12, 11), seed=0):
    """A random normalised batch (odd sizes catch height/width mix-ups) and distinct labels."""
    b, h, w = size
    pixels = torch.rand(b, channels, h, w, generator=torch.Generator().manual_seed(seed))
    return normalise(pixels, channels, dtype), torch.arange(b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("op", PERTURBATIONS)
def test_contract(op, channels, dtype):
    images, labels = batch(channels, dtype)
    # seed 1 draws a rotation of 15.5 degrees (seed 0's -0.2 degrees leaves a nearest-sampled 12x11 image as it is)
    out, labels_perm, lam = run(op, images, labels, channels, seed=1 if op == "rotation" else 0)
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
    assert torch.isfinite(out).all()
    pixels = to_pixels(out, channels)
    tol = PIXEL_ATOL[dtype]
    assert pixels.min() >= -tol and pixels.max() <= 1 + tol
    assert labels_perm.dtype == torch.int64 and labels_perm.shape == labels.shape
    assert lam.dtype == torch.float32 and lam.dim() == 0 and lam.device == images.device
    assert 0 <= lam.item() <= 1
    if op != "mixup":
        assert lam.item() == 1.0
        assert torch.equal(labels_perm, labels)
    else:
        assert torch.equal(labels_perm.sort().values, labels)
    # Every operation changes a random batch (a flip of random content is not symmetric).
    assert not torch.equal(out, images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", PERTURBATIONS)
def test_deterministic_under_seed(op, dtype):
    images, labels = batch(3, dtype)
    first, second = run(op, images, labels, 3, seed=1), run(op, images, labels, 3, seed=1)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    if op in RANDOM_OPS:
        other = run(op, images, labels, 3, seed=2)
        assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
def test_mixup_mixes_with_the_partner_of_the_returned_labels(channels, dtype):
    images, labels = batch(channels, dtype)  # labels = arange(B), so labels_perm is the permutation
    for seed in range(5):
        out, perm, lam = run("mixup", images, labels, channels, seed=seed)
        x = to_pixels(images, channels)
        expected = lam * x + (1 - lam) * x[perm]
        torch.testing.assert_close(to_pixels(out, channels), expected, atol=PIXEL_ATOL[dtype], rtol=0)


def test_mixup_lambda_covers_unit_interval():
    images, labels = batch(1, size=(4, 5, 5))
    lams = torch.stack([run("mixup", images, labels, 1, seed=s)[2] for s in range(200)])
    assert lams.min() >= 0 and lams.max() <= 1
    assert lams.min() < 0.1 and lams.max() > 0.9 and abs(lams.mean().item() - 0.5) < 0.07


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
def test_flips_are_exact(channels, dtype):
    images, labels = batch(channels, dtype)
    assert torch.equal(run("hflip", images, labels, channels)[0], images.flip(-1))
    assert torch.equal(run("vflip", images, labels, channels)[0], images.flip(-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_noise_std(dtype):
    channels = 3
    grey = normalise(torch.full((4, channels, 32, 32), 0.5), channels, dtype)
    out, _, _ = run("gaussian_noise", grey, torch.arange(4), channels)
    deviation = to_pixels(out, channels) - to_pixels(grey, channels)
    # Clipping at 0 and 1 (2 sigma away) touches ~5 % of pixels; the median absolute deviation,
    # 0.6745 sigma for a normal, does not see them.
    sigma = deviation.abs().median().item() / 0.6745
    assert abs(sigma - 0.25) < 0.01
    assert abs(deviation.mean().item()) < 0.01
    assert (deviation.abs() < 0.03).float().mean() < 0.2  # noise, not a small shift


def test_noise_is_in_pixel_units_not_normalised_units():
    # With std = 0.5 a normalised-space N(0, 0.25^2) would be only 0.125 in pixels.
    mean, std = (0.5,), (0.5,)
    grey = torch.zeros(4, 1, 32, 32)  # pixel value 0.5
    out, _, _ = perturb(grey, torch.arange(4), "gaussian_noise", mean=mean, std=std,
                        generator=torch.Generator().manual_seed(0))
    deviation = out * 0.5  # back to pixel units
    assert abs(deviation.abs().median().item() / 0.6745 - 0.25) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 3])
def test_rotation_keeps_centre_and_fills_corners_with_mean(channels, dtype):
    size = 15  # odd, so one pixel sits exactly on the rotation centre
    images, labels = batch(channels, dtype, size=(4, size, size))
    centre = size // 2
    rotated_corners = 0
    for seed in range(12):
        out, _, _ = run("rotation", images, labels, channels, seed=seed)
        # The draw perturb makes: one uniform in [-30, 30] degrees from the generator.
        angle = torch.rand((), generator=torch.Generator().manual_seed(seed)).item() * 60 - 30
        mean = STATS[channels][0]
        expected = TF.rotate(to_pixels(images, channels), angle, interpolation=TF.InterpolationMode.NEAREST,
                             fill=list(mean)).clamp(0, 1)
        pixels = to_pixels(out, channels)
        assert_nearly_all_close(pixels, expected, atol=PIXEL_ATOL[dtype])
        torch.testing.assert_close(pixels[..., centre, centre], to_pixels(images, channels)[..., centre, centre],
                                   atol=PIXEL_ATOL[dtype], rtol=1e-4)
        # A corner of a 15x15 image moves > 1.5 px once |angle| > 9 degrees: wholly filled.
        if abs(angle) > 9:
            rotated_corners += 1
            corners = pixels[..., [0, 0, -1, -1], [0, -1, 0, -1]]  # (B, C, 4)
            torch.testing.assert_close(corners, torch.tensor(mean).view(1, -1, 1).expand_as(corners),
                                       atol=PIXEL_ATOL[dtype], rtol=0)
    assert rotated_corners >= 3  # the corner check above really ran


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_blur_matches_torchvision(channels):
    images, labels = batch(channels, size=(4, 16, 16))
    for seed in range(3):
        out, _, _ = run("color_jitter_blur", images, labels, channels, seed=seed)
        # The draws perturb makes: five uniforms, in this order, from the generator.
        u = torch.rand(5, generator=torch.Generator().manual_seed(seed)).tolist()
        brightness, contrast, saturation = 0.75 + 0.5 * u[0], 0.85 + 0.3 * u[1], 0.85 + 0.3 * u[2]
        hue, sigma = -0.15 + 0.3 * u[3], 0.1 + 1.9 * u[4]
        expected = TF.adjust_contrast(TF.adjust_brightness(to_pixels(images, channels), brightness), contrast)
        if channels == 3:
            expected = TF.adjust_hue(TF.adjust_saturation(expected, saturation), hue)
        expected = TF.gaussian_blur(expected, [7, 9], [sigma, sigma])
        torch.testing.assert_close(to_pixels(out, channels), expected, atol=1e-5, rtol=0)


def test_color_jitter_blur_smooths():
    images, labels = batch(3, size=(4, 32, 32))
    ratios = []
    for seed in range(6):
        out, _, _ = run("color_jitter_blur", images, labels, 3, seed=seed)
        ratios.append(to_pixels(out, 3).diff(dim=-2).abs().mean() / to_pixels(images, 3).diff(dim=-2).abs().mean())
    # Contrast alone (factor >= 0.85) keeps neighbour differences of white noise above ~0.85; a blur
    # with sigma > 0.5 (drawn ~80 % of the time) cuts them far more.
    assert sum(ratio < 0.7 for ratio in ratios) >= 3, ratios


def test_color_jitter_blur_on_tiny_images():
    images, labels = batch(3, size=(2, 3, 3))  # smaller than the 7x9 kernel
    out, _, _ = run("color_jitter_blur", images, labels, 3)
    assert out.shape == images.shape and torch.isfinite(out).all()


def test_unknown_op_lists_the_choices():
    images, labels = batch(1)
    with pytest.raises(ValueError, match="mixup, gaussian_noise"):
        run("cutout", images, labels, 1)


def test_mean_std_length_must_match_channels():
    images, labels = batch(3)
    with pytest.raises(ValueError, match="channels"):
        run("mixup", images, labels, 1)


def test_mixed_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.5]])
    labels, labels_perm = torch.tensor([0, 2]), torch.tensor([1, 0])
    lam = torch.tensor(0.3)

    def ce(row, k):
        return -logits[row, k].item() + math.log(sum(math.exp(v) for v in logits[row].tolist()))

    by_hand = sum(0.3 * ce(i, labels[i]) + 0.7 * ce(i, labels_perm[i]) for i in range(2)) / 2
    torch.testing.assert_close(mixed_cross_entropy(logits, labels, labels_perm, lam), torch.tensor(by_hand))
    assert torch.equal(mixed_cross_entropy(logits, labels, labels_perm, torch.tensor(1.0)),
                       F.cross_entropy(logits, labels))
    torch.testing.assert_close(mixed_cross_entropy(logits, labels, labels, lam), F.cross_entropy(logits, labels))


def assert_nearly_all_close(actual, expected, *, atol, share=0.995):
    """At least `share` of the values agree within atol: nearest sampling at a coordinate that float
    rounding puts on the other side of a tie reads the neighbouring pixel."""
    close = ((actual - expected).abs() <= atol).float().mean().item()
    assert close >= share, close


def make_perturber(**overrides):
    kwargs = dict(every=10, ops=PERTURBATIONS, num_nets=3, seed=0, mean=STATS[3][0], std=STATS[3][1],
                  device="cpu")
    kwargs.update(overrides)
    return Perturber(**kwargs)


def perturbed(perturber, step, images, labels):
    """(net, the perturbed network's images, labels_perm, its lam) of one step; (-1, images, labels, 1) when clean."""
    batch = perturber(step, images, labels)
    net = batch.net
    return net, batch.inputs[max(net, 0)], batch.labels_perm, batch.lams[max(net, 0)]


def test_perturber_only_on_multiples_of_every():
    perturber = make_perturber(every=4)
    images, labels = batch(3, size=(2, 8, 8))
    for step in range(13):
        net, images_p, labels_perm, lam = perturbed(perturber, step, images, labels)
        if step % 4:
            assert net == -1 and images_p is images and labels_perm is labels and lam.item() == 1.0
        else:
            assert 0 <= net < 3 and images_p.shape == images.shape
    disabled = make_perturber(every=0)
    for step in range(5):
        net, images_p, labels_perm, lam = perturbed(disabled, step, images, labels)
        assert net == -1 and images_p is images and labels_perm is labels
        assert lam.dtype == torch.float32 and lam.item() == 1.0


def test_perturber_choices_are_uniform():
    perturber = make_perturber(every=1)
    draws = 3000
    nets, ops = torch.zeros(3), {op: 0 for op in PERTURBATIONS}
    for step in range(draws):
        net, op = perturber.choose(step)
        nets[net] += 1
        ops[op] += 1
    assert ((nets - draws / 3).abs() < 0.1 * draws / 3).all(), nets
    assert all(abs(n - draws / 6) < 0.2 * draws / 6 for n in ops.values()), ops


def test_perturber_draws_only_from_given_ops():
    perturber = make_perturber(every=1, ops=("hflip", "vflip"), num_nets=1)
    assert {perturber.choose(step)[1] for step in range(50)} == {"hflip", "vflip"}
    assert {perturber.choose(step)[0] for step in range(50)} == {0}


def sequence(perturber, steps, images, labels):
    return [perturbed(perturber, step, images, labels) for step in steps]


def assert_same(first, second):
    assert len(first) == len(second)
    for (net_a, *tensors_a), (net_b, *tensors_b) in zip(first, second):
        assert net_a == net_b
        for a, b in zip(tensors_a, tensors_b):
            assert torch.equal(a, b)


def test_perturber_same_seed_same_sequence():
    images, labels = batch(3, size=(4, 8, 8))
    steps = range(0, 40)
    first = sequence(make_perturber(every=2, seed=5), steps, images, labels)
    second = sequence(make_perturber(every=2, seed=5), steps, images, labels)
    assert_same(first, second)
    other = sequence(make_perturber(every=2, seed=6), steps, images, labels)
    assert [n for n, *_ in first] != [n for n, *_ in other]
    # __call__ perturbs the network that choose() would pick.
    chooser = make_perturber(every=2, seed=5)
    assert [chooser.choose(s)[0] for s in steps] == [n for n, *_ in first]


def test_perturber_state_dict_resumes_exactly():
    images, labels = batch(3, size=(4, 8, 8))
    straight = make_perturber(every=1, seed=3)
    sequence(straight, range(10), images, labels)
    buffer = io.BytesIO()
    torch.save(straight.state_dict(), buffer)  # a checkpoint holds tensors only
    expected = sequence(straight, range(10, 30), images, labels)

    buffer.seek(0)
    resumed = make_perturber(every=1, seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same(sequence(resumed, range(10, 30), images, labels), expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(every=-1), "--perturb-every"),
    (dict(num_nets=0), "at least one network"),
    (dict(ops=("mixup", "cutmix")), "choose from mixup, gaussian_noise"),
    (dict(ops=()), "--perturbations is empty"),
])
def test_perturber_rejects_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        make_perturber(**overrides)
    assert "\n" not in str(error.value)


def test_perturber_with_no_ops_is_fine_when_disabled():
    perturber = make_perturber(every=0, ops=())
    images, labels = batch(1, size=(2, 8, 8))
    assert perturber(0, images, labels).net == -1


@pytest.mark.parametrize("op", ["rotation", "color_jitter_blur"])
def test_scalar_parameters_come_from_the_param_generator(op):
    """Angles and jitter factors are drawn on the host generator (no device read-back on a GPU):
    the pixel generator's seed does not change them."""
    images, labels = batch(3, size=(4, 16, 16))
    mean, std = STATS[3]
    outs = [perturb(images, labels, op, mean=mean, std=std, generator=torch.Generator().manual_seed(device_seed),
                    param_generator=torch.Generator().manual_seed(7))[0] for device_seed in (0, 1)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    other = perturb(images, labels, op, mean=mean, std=std, generator=torch.Generator().manual_seed(0),
                    param_generator=torch.Generator().manual_seed(8))[0]
    assert not torch.equal(outs[0], other)


def test_the_group_batch_feeds_the_perturbed_network_only():
    images, labels = batch(3, size=(6, 8, 8))
    perturber = make_perturber(every=1, seed=1, ops=["mixup"], num_nets=3)
    for step in range(4):
        reference = copy.deepcopy(perturber)  # the same draws through perturb() itself
        net, op = reference.choose(step)
        reference._reseed_pixel_generator()
        images_p, labels_perm, lam = perturb(images, labels, op, mean=STATS[3][0], std=STATS[3][1],
                                             generator=reference.pixel_generator, param_generator=reference.param_generator)
        inputs, perm, lams, perturbed_net = perturber(step, images, labels)
        assert len(inputs) == 3 and all(inputs[i] is images for i in range(3) if i != net)
        assert torch.equal(inputs[net], images_p) and torch.equal(perm, labels_perm)
        assert lams.tolist() == [lam.item() if i == net else 1.0 for i in range(3)] and perturbed_net == net
    clean_inputs, _, clean_lams, perturbed_net = make_perturber(every=0, seed=1, num_nets=3)(0, images, labels)
    assert all(x is images for x in clean_inputs) and clean_lams.tolist() == [1.0, 1.0, 1.0] and perturbed_net == -1


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("size", [(3, 12, 11), (2, 20, 33)])
def test_rotation_equals_torchvision_rotate_on_non_square_images(size, dtype, atol):
    """The rotation builds its affine grid on the device; the result is torchvision's rotate (nearest,
    mean fill) up to float rounding, which at an exact tie of the grid may pick the other neighbour."""
    mean, std = STATS[3]
    mean_t, std_t = (torch.tensor(s, dtype=torch.float64).view(-1, 1, 1) for s in (mean, std))
    pixels = torch.rand(size[0], 3, *size[1:], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    images, labels = (pixels - mean_t) / std_t, torch.arange(size[0])
    for seed in range(4):
        out, _, _ = perturb(images.to(dtype), labels, "rotation", mean=mean, std=std,
                            generator=torch.Generator().manual_seed(seed))
        angle = torch.rand((), generator=torch.Generator().manual_seed(seed)).item() * 60 - 30
        expected = TF.rotate(pixels, angle, interpolation=TF.InterpolationMode.NEAREST, fill=list(mean)).clamp(0, 1)
        assert_nearly_all_close(out.double() * std_t + mean_t, expected, atol=atol)


def test_perturbed_steps_make_no_tensor_from_python_numbers_on_the_device(monkeypatch):
    """torch.tensor(..., device=...) from Python numbers is a blocking host-to-device copy on a GPU:
    after a warm-up (which builds the cached constants) no perturbed step makes one."""
    images, labels = batch(3, size=(4, 12, 11))
    perturber = make_perturber(every=1)
    for op in PERTURBATIONS:
        perturber.ops = (op,)
        perturber(0, images, labels)
    made = []

    def guarded(make):
        def wrapper(*args, **kwargs):
            if kwargs.get("device") is not None:
                made.append(f"{make.__name__}({args[0]!r}, device={kwargs['device']})")
            return make(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "tensor", guarded(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", guarded(torch.as_tensor))
    for op in PERTURBATIONS:
        perturber.ops = (op,)
        for step in range(3):
            inputs, _, _, _ = perturber(step, images, labels)
            assert any(x is not images for x in inputs), op  # the step was perturbed
    assert made == []


def test_pixel_randomness_does_not_depend_on_the_pixel_generator_state():
    """The pixel generator is reseeded from (seed, rank, step) at every perturbed step, so its state
    is never saved and a checkpoint resumes the same noise on another device."""
    images, labels = batch(3, size=(4, 8, 8))
    ops = ("mixup", "gaussian_noise")
    straight = sequence(make_perturber(every=1, ops=ops), range(6), images, labels)
    scrambled = make_perturber(every=1, ops=ops)
    scrambled.pixel_generator.manual_seed(12345)
    torch.rand(100, generator=scrambled.pixel_generator)
    assert_same(sequence(scrambled, range(6), images, labels), straight)
    state = make_perturber(every=1).state_dict()
    assert set(state) == {"host_generator", "param_generator", "seed", "perturbed_steps"}


@pytest.mark.parametrize("device", DEVICES)
def test_pixel_draws_are_a_cpu_generators_whatever_the_device(device):
    """The noise, mixup weights and partners are drawn by a CPU generator and moved to the batch's
    device, so a run resumed on another device type continues the same perturbations. On the CPU the
    device is only claimed (no CUDA generator is made); on a GPU the batch is there too."""
    images, labels = batch(3, size=(6, 8, 8))
    ops = ("mixup", "gaussian_noise")
    on_cpu = sequence(make_perturber(every=1, ops=ops, device="cpu"), range(8), images, labels)
    perturber = make_perturber(every=1, ops=ops, device=torch.device("cuda"))
    assert perturber.pixel_generator.device.type == "cpu"
    elsewhere = sequence(perturber, range(8), images.to(device), labels.to(device))
    assert [net for net, *_ in elsewhere] == [net for net, *_ in on_cpu]
    for (_, images_a, perm_a, lam_a), (_, images_b, perm_b, lam_b) in zip(on_cpu, elsewhere):
        assert images_b.device.type == perm_b.device.type == lam_b.device.type == device
        assert torch.equal(perm_a, perm_b.cpu()) and torch.equal(lam_a, lam_b.cpu())
        torch.testing.assert_close(images_b.cpu(), images_a, rtol=0, atol=1e-6)  # one rounding of the GPU's kernels at most


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_bn_statistics_are_restored_in_one_foreach_call(foreach, monkeypatch):
    """Every BatchNorm buffer (float statistics and integer counts) comes back in one
    torch._foreach_copy_ call, or one copy per buffer where torch has no such function."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                              torch.nn.BatchNorm2d(4, momentum=None))
    net(torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []
    if foreach:
        foreach_copy = torch._foreach_copy_
        monkeypatch.setattr(torch, "_foreach_copy_", lambda *args: calls.append(args) or foreach_copy(*args))
    else:
        monkeypatch.delattr(torch, "_foreach_copy_")
    with bn_statistics_kept(net):
        net(torch.randn(4, 3, 8, 8) * 5)
    assert len(calls) == (1 if foreach else 0)
    assert not calls or len(calls[0][0]) == 6  # 2 x (running_mean, running_var, num_batches_tracked)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("op", PERTURBATIONS)
def test_ranks_share_the_choices_and_scalars_but_not_the_noise(op):
    """Data-parallel ranks perturb the same network with the same operation and scalar parameters,
    but draw their own noise field and mixup partners."""
    images, labels = batch(3, size=(8, 12, 11))
    draws = [sequence(make_perturber(every=1, ops=PERTURBATIONS, rank=rank), range(12), images, labels)
             for rank in (0, 1)]
    chosen = [[net for net, *_ in ranked] for ranked in draws]
    assert chosen[0] == chosen[1]
    ranks = [sequence(make_perturber(every=1, ops=(op,), rank=rank), range(3), images, labels) for rank in (0, 1)]
    for (net0, images0, perm0, lam0), (net1, images1, perm1, lam1) in zip(*ranks):
        assert net0 == net1
        if op in ("mixup", "gaussian_noise"):
            assert not torch.equal(images0, images1)
        else:
            assert torch.equal(images0, images1) and torch.equal(perm0, perm1) and torch.equal(lam0, lam1)


def test_bn_statistics_kept_restores_running_statistics_only():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with bn_statistics_kept(net):
        net(torch.randn(4, 3, 8, 8) * 5).square().mean().backward()
        optimizer.step()
    after = net.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["0.weight"], before["0.weight"])  # the weights still learn
    with bn_statistics_kept(None):
        net(torch.randn(4, 3, 8, 8))
    assert not torch.equal(net.state_dict()["1.running_mean"], before["1.running_mean"])


@pytest.mark.parametrize("script", ["competitive", "mutual"])
@pytest.mark.parametrize("update", [False, True])
def test_a_perturbed_batch_skips_its_networks_bn_statistics(script, update, tmp_path, monkeypatch):
    """Every step perturbs network 0 (monkeypatched draw): its running statistics stay at their initial
    values, network 1's move; --update-bn-on-perturbed restores the authors' behaviour."""
    import train_competitive_distillation
    import train_mutual_learning
    module = {"competitive": train_competitive_distillation, "mutual": train_mutual_learning}[script]
    monkeypatch.setattr(Perturber, "choose", lambda self, step: (0, "hflip"))
    args = ["--dataset", "fake", "--img-size", "16", "--train-subset", "64", "--val-size", "0", "--batch-size", "32",
            "--device", "cpu", "--workers", "0", "--no-progress", "--models", "resnet20", "resnet20", "--epochs", "1",
            "--perturb-every", "1", "--out-dir", str(tmp_path / "run")] + (["--update-bn-on-perturbed"] if update else [])
    module.main(module.get_args_parser().parse_args(args))
    nets = checkpoints.load_checkpoint(str(tmp_path / "run" / "last.pt"))["nets"]
    fresh = [torch.equal(net["features.1.running_mean"], torch.zeros_like(net["features.1.running_mean"])) for net in nets]
    assert fresh == [not update, False]


def test_a_run_with_four_step_epochs_perturbs_exactly_one_step_in_n(monkeypatch, tmp_path):
    """--perturb-every counts the run's global step: with 4-step epochs and N = 3, steps 0, 3, 6, 9
    of 12 are perturbed (counting within the epoch would perturb steps 0 and 3 of every epoch: 6)."""
    import train_competitive_distillation as competitive
    chosen = []

    class Recording(Perturber):
        def choose(self, step):
            net, op = super().choose(step)
            chosen.append((step, net))
            return net, op

    monkeypatch.setattr(lifecycle, "Perturber", Recording)
    args = competitive.get_args_parser().parse_args([
        "--dataset", "fake", "--img-size", "8", "--train-subset", "64", "--val-size", "0", "--batch-size", "16",
        "--device", "cpu", "--workers", "0", "--no-progress", "--models", "resnet20", "resnet20", "--epochs", "3",
        "--perturb-every", "3", "--eval-every", "3", "--out-dir", str(tmp_path)])
    competitive.main(args)
    assert [step for step, _ in chosen] == list(range(12))
    assert [step for step, net in chosen if net >= 0] == [0, 3, 6, 9]


def test_the_statistics_guard_covers_every_norm_that_keeps_running_statistics():
    """InstanceNorm with track_running_stats (in some tv:/timm: networks) keeps its statistics too;
    LayerNorm has none and is left alone."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                              torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True), torch.nn.LayerNorm([4, 6, 6]))
    before = {key: value.clone() for key, value in net.state_dict().items()}
    with bn_statistics_kept(net):
        net.train()(torch.randn(5, 3, 8, 8))
    after = net.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked",
                "2.running_mean", "2.running_var", "2.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key
    net(torch.randn(5, 3, 8, 8))  # outside the guard they move
    assert not torch.equal(net.state_dict()["2.running_mean"], before["2.running_mean"])


def test_the_rotation_grid_is_built_without_tf32():
    """exact_matmul turns TF32 matrix products off inside the block (F.affine_grid's) and restores the setting."""
    from perturb import exact_matmul
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with exact_matmul():
            assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("device", DEVICES)
def test_rotation_and_blur_on_a_device_are_the_cpus(device):
    """With TF32 matrix products on, as utils.setup_runtime sets them on CUDA, a rotated batch samples the
    pixels a CPU run samples (the grid is built without TF32) and a blurred one is the CPU's to rounding."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        images, labels = batch(3, size=(6, 28, 28))
        for op, atol in (("rotation", 1e-6), ("color_jitter_blur", 1e-5)):
            on_cpu = sequence(make_perturber(every=1, ops=(op,), device="cpu"), range(6), images, labels)
            elsewhere = sequence(make_perturber(every=1, ops=(op,), device=torch.device(device)), range(6),
                                 images.to(device), labels.to(device))
            for (net_a, images_a, *_), (net_b, images_b, *_) in zip(on_cpu, elsewhere):
                assert net_a == net_b and images_b.device.type == device
                torch.testing.assert_close(images_b.cpu(), images_a, rtol=0, atol=atol)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
