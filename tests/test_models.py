"""The model contract, checked for every registered network (CPU, batch 2, small inputs).

Contract (models/__init__.py): create_model(name, *, num_classes, img_size, in_chans, **kwargs)
builds a module whose forward maps (B, in_chans, img_size, img_size) to logits (B, num_classes)
in train and eval mode; sizes a model cannot take raise a readable ValueError.
"""
import re

import pytest
import torch
import torch.nn.functional as F

import models

ALL_MODELS = models.list_models()
CNNS = [name for name in ALL_MODELS if name not in models.TRANSFORMERS]
TRANSFORMERS = sorted(models.TRANSFORMERS)

# An odd class count catches heads that assume 10, 100 or 1000 classes.
NUM_CLASSES = 7
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this file's tests on one intra-op thread, restoring the setting afterwards."""
    # Batch-2 tensors gain nothing from more threads, and on a shared, busy CPU OpenMP's
    # spin-waiting made this file about five times slower with two threads than with one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(name, img_size=32, in_chans=3, **kwargs):
    """The model `name` for NUM_CLASSES classes, with a fixed seed so failures reproduce."""
    torch.manual_seed(0)
    return models.create_model(name, num_classes=NUM_CLASSES, img_size=img_size,
                               in_chans=in_chans, **kwargs)


def images(img_size=32, in_chans=3, batch=BATCH):
    """A seeded batch of normalised-looking images."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, in_chans, img_size, img_size, generator=generator)


def assert_logits(logits, batch=BATCH):
    """Logits are one finite tensor of shape (batch, NUM_CLASSES), not a tuple of heads."""
    assert isinstance(logits, torch.Tensor), f"forward returned {type(logits).__name__}, not logits"
    assert logits.shape == (batch, NUM_CLASSES)
    assert torch.isfinite(logits).all(), "logits contain NaN or inf"


def parameter_count(model):
    """Number of trainable scalars in `model`."""
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_train_step_then_eval_at_32px(name):
    """32 px RGB: train-mode logits, a finite gradient for every parameter, then eval-mode logits.

    Eval follows a training step, as in use: with a fresh BN's identity running statistics the
    600 un-normalised residual additions of ResNet-1202 overflow to NaN in eval mode.
    """
    model = build(name).train()
    x = images()
    logits = model(x)
    assert_logits(logits)
    targets = torch.arange(BATCH) % NUM_CLASSES
    F.cross_entropy(logits, targets).backward()
    missing = [pname for pname, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing, f"parameters without gradient (unused in forward?): {missing[:10]}"
    non_finite = [pname for pname, parameter in model.named_parameters()
                  if not torch.isfinite(parameter.grad).all()]
    assert not non_finite, f"non-finite gradients: {non_finite[:10]}"
    with torch.no_grad():
        assert_logits(model.eval()(x))


@pytest.mark.parametrize("name", [name for name in ALL_MODELS if name != "vit"])
def test_single_channel_28px(name):
    """Grey 28 px inputs (MNIST, Fashion-MNIST) work in train and eval mode (not the authors' `vit`,
    whose 16x16 patches need a multiple of 16: test_authors_networks).

    Built with an explicit drop_path_rate=0.0, which every model accepts (one interface).
    """
    model = build(name, img_size=28, in_chans=1, drop_path_rate=0.0)
    x = images(img_size=28, in_chans=1)
    with torch.no_grad():
        assert_logits(model.train()(x))
        assert_logits(model.eval()(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_too_small_img_size_is_a_readable_error(name):
    """A 2 px input is refused with a ValueError that names img_size and the size given."""
    with pytest.raises(ValueError, match=r"img_size") as error:
        build(name, img_size=2)
    assert re.search(r"\b2\b", str(error.value)), f"message does not show the size: {error.value}"


@pytest.mark.parametrize("name", CNNS)
def test_cnn_minimum_img_size_is_stated_and_works(name):
    """CNNs say '<model>: img_size 2 too small, needs >= M', and M itself works."""
    with pytest.raises(ValueError, match=rf"^{name}: img_size 2 too small, needs >= \d+$") as error:
        build(name, img_size=2)
    min_size = int(re.search(r"needs >= (\d+)", str(error.value)).group(1))
    model = build(name, img_size=min_size).train()
    with torch.no_grad():
        assert_logits(model(images(img_size=min_size)))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_unknown_keyword_is_a_type_error(name):
    """A misspelt option must fail loudly instead of being silently ignored."""
    with pytest.raises(TypeError):
        build(name, no_such_option=1)


@pytest.mark.parametrize("name", CNNS)
def test_cnn_refuses_nonzero_drop_path(name):
    """A CNN has no drop path, so a non-zero rate is an error rather than a silent no-op."""
    with pytest.raises(ValueError, match="drop path"):
        build(name, drop_path_rate=0.1)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_accepts_drop_path(name):
    """Transformers take a non-zero drop_path_rate and still return logits in train mode."""
    model = build(name, drop_path_rate=0.1).train()
    with torch.no_grad():
        assert_logits(model(images()))


@pytest.mark.parametrize("name, num_classes, img_size, expected", [
    # He et al. 2016 CIFAR ResNets with option-A (parameter-free) shortcuts.
    ("resnet32", 10, 32, 464_154),
    ("resnet32", 100, 32, 470_004),
    ("resnet110", 100, 32, 1_733_812),
    # Zagoruyko & Komodakis 2016 print 36.5 M; this is the count of their reference code.
    ("wrn_28_10", 10, 32, 36_479_194),
    # ImageNet layouts match torchvision's MobileNet V2 and the V1 paper's 4.2 M.
    ("mobilenet_v1", 1000, 224, 4_231_976),
    ("mobilenet_v2", 1000, 224, 3_504_872),
])
def test_pinned_parameter_count(name, num_classes, img_size, expected):
    """Exact parameter counts that pin the architectures to their references."""
    model = models.create_model(name, num_classes=num_classes, img_size=img_size, in_chans=3)
    assert parameter_count(model) == expected


@pytest.mark.parametrize("name, millions", [
    # ResNets as printed in He et al. 2016 (Table 6); WRN-16-8 as in Zagoruyko & Komodakis 2016;
    # WRN-40-2 as commonly cited (e.g. RepDistiller's tables).
    ("resnet20", 0.27), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7),
    ("resnet1202", 19.4), ("wrn_16_8", 11.0), ("wrn_40_2", 2.2),
])
def test_paper_parameter_count(name, millions):
    """Parameter counts at 10 classes agree with the papers' rounded figures."""
    model = models.create_model(name, num_classes=10, img_size=32, in_chans=3)
    decimals = len(str(millions).split(".")[1])
    assert round(parameter_count(model) / 1e6, decimals) == millions


@pytest.mark.parametrize("name, img_size, expected_map", [
    # Small inputs keep a spatial map (CIFAR stems); from 128 px the ImageNet stems give stride 32.
    ("resnet20", 32, 8), ("wrn_40_2", 32, 8),
    ("mobilenet_v1", 32, 2), ("mobilenet_v1", 127, 8), ("mobilenet_v1", 128, 4),
    ("mobilenet_v2", 32, 4), ("mobilenet_v2", 127, 16), ("mobilenet_v2", 128, 4),
    ("inception_v1", 32, 8), ("inception_v1", 128, 4),
])
def test_cnn_feature_map_geometry(name, img_size, expected_map):
    """The final feature map has the size the stem choice implies."""
    model = build(name, img_size=img_size).eval()
    with torch.no_grad():
        features = model.features(images(img_size=img_size, batch=1))
    assert features.shape[-2:] == (expected_map, expected_map)


@pytest.mark.parametrize("name", ["wrn_40_2", "mobilenet_v2", "inception_v1"])
def test_dropout_only_in_train_mode(name):
    """With drop_rate > 0, train-mode outputs are random and eval-mode outputs are not."""
    model = build(name, img_size=16, drop_rate=0.5)
    x = images(img_size=16)
    with torch.no_grad():
        assert not torch.equal(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))


def test_unknown_name_lists_valid_names():
    """A wrong name fails with a ValueError that lists every valid name and alias."""
    with pytest.raises(ValueError) as error:
        models.create_model("resnet33", num_classes=10, img_size=32, in_chans=3)
    message = str(error.value)
    assert "resnet33" in message
    missing = [name for name in models.list_models(aliases=True) if name not in message]
    assert not missing, f"error message does not list {missing}"


def test_zero_classes_is_an_error():
    """num_classes < 1 is refused before any model is built."""
    with pytest.raises(ValueError, match="num_classes"):
        models.create_model("resnet20", num_classes=0, img_size=32, in_chans=3)


@pytest.mark.parametrize("alias, target", [
    ("resnet", "resnet32"), ("wideresnet", "wrn_28_10"), ("mobilenet", "mobilenet"),
    ("inception", "inception_v1"), ("googlenet", "inception_v1"), ("vit", "vit"),
    ("ceit", "ceit"), ("ResNet", "resnet32"), ("WRN-28-10", "wrn_28_10"), ("ViT", "vit"),
])
def test_alias_resolves(alias, target):
    """The authors' short names (any case, '-' for '_') map to registry names."""
    assert models.resolve_name(alias) == target


def test_alias_builds_the_target_model():
    """`create_model('resnet', ...)` is ResNet-32, the authors' `--model resnet`."""
    model = models.create_model("resnet", num_classes=10, img_size=32, in_chans=3)
    assert parameter_count(model) == 464_154


def test_aliases_and_transformers_name_registered_models():
    """Every alias and every transformer name points into the registry that the tests cover."""
    assert set(models.ALIASES.values()) <= set(models.MODELS)
    assert models.TRANSFORMERS <= set(models.MODELS)



def test_authors_networks():
    """`vit`, `mobilenet` and `ceit` are the competitive-distillation authors' networks: a ViT-Base with
    16x16 patches and dropout 0.1 at every size, MobileNet V1 with its stride-1 stem at every size, and
    CeiT-T with a 32-channel stem and no LCA; the DeiT/CeiT-paper variants keep their own names.
    (Their layers in detail, and exact parameter counts: tests/test_transformers.py.)"""
    vit = models.create_model("vit", num_classes=10, img_size=32, in_chans=3)
    assert vit.patch_size == 16 and vit.num_patches == 4 and len(vit.blocks) == 12
    assert vit.blocks[0].attn.q.in_features == 768 and vit.blocks[0].mlp.fc1.out_features == 3072
    assert vit.pos_drop.p == 0.1 and vit.blocks[0].attn.attn_drop_rate == 0.1 and vit.blocks[0].mlp.drop.p == 0.1
    assert isinstance(vit.blocks[0].mlp.hidden_drop, torch.nn.Identity)
    base = models.create_model("vit_base", num_classes=10, img_size=32, in_chans=3, patch_size=16)
    # vit_base's q, k, v and output projections carry a bias (768 values each, 12 blocks); the authors' do not.
    assert parameter_count(vit) == parameter_count(base) - 12 * 4 * 768
    with pytest.raises(ValueError, match="multiple of 16"):
        models.create_model("vit", num_classes=10, img_size=28, in_chans=1)
    mobilenet = models.create_model("mobilenet", num_classes=10, img_size=224, in_chans=3)
    assert mobilenet.features[0][0].stride == (1, 1)
    assert models.create_model("mobilenet_v1", num_classes=10, img_size=224, in_chans=3).features[0][0].stride == (2, 2)
    ceit = models.create_model("ceit", num_classes=10, img_size=32, in_chans=3)
    assert ceit.i2t.conv.out_channels == 32 and ceit.lca is None and len(ceit.blocks) == 12
    assert ceit.blocks[0].attn.q.in_features == 192
    tiny = models.create_model("ceit_tiny", num_classes=10, img_size=32, in_chans=3)
    assert tiny.i2t.conv.out_channels == 64 and tiny.lca is not None
