"""Branched networks for ONE and OKDDip (models/branched.py): shapes, gradients, sizes, export."""
import pytest
import torch
import torch.nn.functional as F

import losses
import models
from models.branched import BRANCHABLE, create_branched

# An odd class count catches heads that assume 10, 100 or 1000 classes.
NUM_CLASSES = 7
BATCH = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this file's tests on one intra-op thread, restoring the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(base="resnet20", branches=3, img_size=16, num_classes=NUM_CLASSES, **kwargs):
    """A seeded branched network on `base`."""
    torch.manual_seed(0)
    return create_branched(base, branches=branches, num_classes=num_classes, img_size=img_size,
                           in_chans=3, **kwargs)


def images(img_size=16, batch=BATCH):
    """A seeded batch of normalised-looking images."""
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))


def parameter_count(model):
    """Number of trainable scalars in `model`."""
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("base", ["resnet20", "wrn_40_2"])
@pytest.mark.parametrize("options", [dict(gate=True), dict(peer_attention=True, deployed=-1)])
def test_shapes_in_train_and_eval(base, options):
    model = build(base, **options)
    x = images()
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            logits = model(x)
            outputs = model.forward_branches(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (BATCH, NUM_CLASSES)
        assert outputs.logits.shape == (3, BATCH, NUM_CLASSES)
        assert outputs.features.shape == (3, BATCH, model.heads[0].in_features)
        if model.gate is None:
            assert outputs.gate is None
        else:
            assert outputs.gate.shape == (BATCH, 3)
            assert torch.allclose(outputs.gate.sum(1), torch.ones(BATCH), atol=1e-6)
        assert torch.isfinite(outputs.logits).all()


def test_every_parameter_gets_a_gradient_one():
    """Branch CEs train trunk and branches; the gate learns through the gated ensemble's CE."""
    model = build(gate=True).train()
    outputs = model.forward_branches(images())
    labels = torch.arange(BATCH) % NUM_CLASSES
    ensemble = losses.gated_ensemble(outputs.logits, outputs.gate)
    loss = sum(F.cross_entropy(z, labels) for z in outputs.logits) + F.cross_entropy(ensemble, labels)
    loss.backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())
    assert model.gate[0].weight.grad.abs().max() > 0


def test_every_parameter_gets_a_gradient_okddip():
    """Peers, leader and the shared projections (through the undetached peer teachers)."""
    model = build(branches=4, peer_attention=True, deployed=-1).train()
    outputs = model.forward_branches(images())
    labels = torch.arange(BATCH) % NUM_CLASSES
    peers, leader = outputs.logits[:-1], outputs.logits[-1]
    queries, keys = model.peer_projections(outputs.features[:-1])
    teachers = losses.peer_teachers(losses.peer_attention_weights(queries, keys), peers)
    loss = sum(F.cross_entropy(z, labels) for z in outputs.logits)
    loss = loss + sum(losses.kd_loss(peers[a], teachers[a], 3.0, detach_teacher=False) for a in range(3))
    loss = loss + losses.kd_loss(leader, peers.mean(0), 3.0, detach_teacher=False)
    loss.backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert model.query.weight.grad.abs().max() > 0 and model.key.weight.grad.abs().max() > 0


def test_detached_peer_teachers_leave_the_projections_untrained():
    model = build(branches=4, peer_attention=True, deployed=-1).train()
    outputs = model.forward_branches(images())
    queries, keys = model.peer_projections(outputs.features[:-1])
    teachers = losses.peer_teachers(losses.peer_attention_weights(queries, keys), outputs.logits[:-1])
    sum(losses.kd_loss(outputs.logits[a], teachers[a], 3.0) for a in range(3)).backward()
    assert model.query.weight.grad is None and model.key.weight.grad is None


def test_parameter_counts():
    """ONE on ResNet-32 (3 branches, gate, 100 classes) about 1.19 M, its deployed branch a plain
    ResNet-32 (0.47 M); OKDDip on ResNet-32 (4 branches, projections 64 -> 8) 1.54 M."""
    one = build("resnet32", branches=3, num_classes=100, img_size=32, gate=True)
    assert parameter_count(one) == 1_186_085 and round(parameter_count(one) / 1e6, 2) == 1.19
    deployed = sum(value.numel() for key, value in one.deployed_state_dict().items()
                   if "running" not in key and "num_batches" not in key)
    plain = models.create_model("resnet32", num_classes=100, img_size=32, in_chans=3)
    assert deployed == parameter_count(plain) == 470_004
    okddip = build("resnet32", branches=4, num_classes=100, img_size=32, peer_attention=True, deployed=-1)
    assert parameter_count(okddip) == 1_544_992
    assert okddip.query.weight.shape == okddip.key.weight.shape == (8, 64)
    assert one.gate[0].in_features == 32      # the gate reads the stage-2 output (C2 = 32)


@pytest.mark.parametrize("base, deployed", [("resnet20", 0), ("resnet20", 2), ("wrn_40_2", -1)])
def test_deployed_state_dict_loads_and_matches_forward(base, deployed):
    model = build(base, deployed=deployed, gate=True)
    x = images()
    with torch.no_grad():
        model.train().forward_branches(x)           # non-trivial BN running statistics
        model.eval()
        logits, outputs = model(x), model.forward_branches(x)
    assert torch.equal(logits, outputs.logits[deployed])
    plain = models.create_model(base, num_classes=NUM_CLASSES, img_size=16, in_chans=3)
    plain.load_state_dict(model.deployed_state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("base", BRANCHABLE)
def test_every_branchable_base_cuts_into_a_loadable_trunk_and_branch(base):
    """Stage 3 starts at the second stride-2 block; the export has exactly the base's keys and shapes."""
    model = build(base, branches=2, img_size=8)
    assert model.stages[0][0].conv1.stride == (2, 2)
    assert model.trunk[model.stage3_start - 1].conv1.stride == (1, 1)
    assert any(getattr(block, "conv1", None) is not None and block.conv1.stride == (2, 2) for block in model.trunk)
    plain = models.create_model(base, num_classes=NUM_CLASSES, img_size=8, in_chans=3).state_dict()
    exported = model.deployed_state_dict()
    assert {key: value.shape for key, value in exported.items()} == {key: value.shape for key, value in plain.items()}
    assert model.base == base


def test_branches_start_from_independent_initialisations():
    model = build()
    first, second = model.stages[0][0].conv1.weight, model.stages[1][0].conv1.weight
    assert not torch.equal(first, second)
    assert not torch.equal(model.heads[0].weight, model.heads[1].weight)


def test_aliases_resolve():
    assert build("resnet", branches=2, img_size=8).base == "resnet32"


@pytest.mark.parametrize("base", ["vit_tiny", "mobilenet_v2", "inception_v1", "tv:resnet18", "timm:resnet18"])
def test_bases_that_cannot_branch_are_refused_in_one_line(base):
    with pytest.raises(ValueError) as error:
        build(base)
    message = str(error.value)
    assert "cannot branch" in message and base in message and "\n" not in message
    assert all(name in message for name in BRANCHABLE)


@pytest.mark.parametrize("branches", [1, 0, -2])
def test_fewer_than_two_branches_is_refused_in_one_line(branches):
    with pytest.raises(ValueError, match=r"^create_branched: branches must be an integer >= 2, got -?\d+$"):
        build(branches=branches)


def test_unknown_base_and_bad_deployed_are_value_errors():
    with pytest.raises(ValueError, match="resnet33"):
        build("resnet33")
    with pytest.raises(ValueError, match="deployed"):
        build(branches=3, deployed=3)


def test_peer_projections_need_peer_attention():
    model = build(gate=True)
    with pytest.raises(ValueError, match="peer_attention"):
        model.peer_projections(torch.zeros(2, 64))
