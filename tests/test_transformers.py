"""Tests specific to the transformers (ViT, CeiT): geometry, chaining, separate q/k/v, LeFF, LCA, drop path.

Kept light for a 2-core CPU: batch 1-2, base variants only at 32 px, parameter counts on the meta device.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import models.ceit as ceit_module
from models import create_model
from models.vit import Attention, DropPath

NUM_CLASSES = 7  # odd, so a wrong class dimension cannot pass by accident
VITS = ["vit_tiny", "vit_small", "vit_base"]
CEITS = ["ceit_tiny", "ceit_small", "ceit_base"]
TINY = ["vit_tiny", "ceit_tiny"]


def build(name, img_size=32, in_chans=3, num_classes=NUM_CLASSES, **kwargs):
    """A freshly initialised model, seeded so that failures reproduce."""
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **kwargs)


def images(batch, in_chans, img_size, seed=1):
    """A reproducible random batch."""
    return torch.randn(batch, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def count(model):
    """Number of parameter values in a model."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- output contract

# Every variant at 32 px; 28 px / 1 channel only for the tiny ones (same geometry code, cheaper to build).
SHAPE_CASES = [(name, 32, 3) for name in VITS + CEITS] + [(name, 28, 1) for name in TINY]


@pytest.mark.parametrize("name,img_size,in_chans", SHAPE_CASES)
def test_logits_shape_train_and_eval(name, img_size, in_chans):
    model = build(name, img_size, in_chans)
    x = images(2, in_chans, img_size)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            logits = model(x)
        assert isinstance(logits, torch.Tensor)  # logits only: the authors' CeiT returned a tuple
        assert logits.shape == (2, NUM_CLASSES)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TINY)
def test_logits_shape_at_224(name):
    model = build(name, 224, 3)
    x = images(1, 3, 224)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            logits = model(x)
        assert logits.shape == (1, NUM_CLASSES)
        assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("img_size,in_chans,patch_size,patches", [
    (32, 3, 4, 64), (28, 1, 4, 49), (96, 3, 8, 144), (224, 3, 16, 196),
])
def test_vit_patch_grid(img_size, in_chans, patch_size, patches):
    model = build("vit_tiny", img_size, in_chans)
    assert model.patch_size == patch_size
    assert model.num_patches == patches
    assert model.pos_embed.shape == (1, 1 + patches, 192)  # one position per patch plus the class token
    with torch.no_grad():
        tokens = model.patch_embed(images(1, in_chans, img_size))
    assert tokens.shape == (1, patches, 192)


def test_vit_patch_size_override():
    model = build("vit_tiny", 32, 3, patch_size=8)
    assert model.num_patches == 16
    assert model(images(1, 3, 32)).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("img_size,in_chans,stem_size,grid", [
    (32, 3, 32, 8),  # small images: conv stride 1, no pool, then 4x4 patches
    (28, 1, 28, 7),
    (96, 3, 24, 6),  # large images: the paper's stem, conv stride 2 + max-pool, then 4x4 patches
    (224, 3, 56, 14),
])
def test_ceit_token_grid(img_size, in_chans, stem_size, grid):
    model = build("ceit_tiny", img_size, in_chans).eval()
    stem = model.i2t
    x = images(1, in_chans, img_size)
    with torch.no_grad():
        features = stem.pool(stem.bn(stem.conv(x)))
        tokens = stem(x)
    assert features.shape == (1, ceit_module.STEM_CHANNELS, stem_size, stem_size)
    assert model.grid_size == grid
    assert tokens.shape == (1, grid * grid, 192)
    assert model.pos_embed.shape == (1, 1 + grid * grid, 192)
    assert all(block.leff is None or block.leff.grid_size == grid for block in model.blocks)


def test_ceit_tokens_are_row_major_and_leff_is_local():
    """I2T lays tokens out row by row, and LeFF's depthwise conv sees each token's 3x3 grid neighbours."""
    model = build("ceit_tiny", 32, 3).eval()
    grid = model.grid_size
    x = images(1, 3, 32)
    nudged = x.clone()
    nudged[0, :, 2, 29] += 5.0  # pixel at row 2, col 29: the 7x7 conv spreads it to tokens (0..1, 6..7)
    with torch.no_grad():
        changed = (model.i2t(nudged) - model.i2t(x)).abs().sum(-1).reshape(grid, grid) > 0
    expected = torch.zeros(grid, grid, dtype=torch.bool)
    expected[0:2, 6:8] = True
    assert torch.equal(changed, expected)

    leff = model.blocks[0].leff
    patches = torch.randn(1, grid * grid, 192, generator=torch.Generator().manual_seed(2))
    nudged_patches = patches.clone()
    nudged_patches[0, 2 * grid + 5] += 1.0  # token at row 2, col 5 (a transposed layout would move it)
    with torch.no_grad():
        changed = (leff(nudged_patches) - leff(patches)).abs().sum(-1).reshape(grid, grid) > 0
    expected = torch.zeros(grid, grid, dtype=torch.bool)
    expected[1:4, 4:7] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny", {"img_size": 30}),  # patch 4 does not divide 30
    ("vit_tiny", {"img_size": 100}),  # patch 8 does not divide 100
    ("vit_tiny", {"img_size": 224, "patch_size": 15}),
    ("ceit_tiny", {"img_size": 30}),  # not a multiple of 4
    ("ceit_tiny", {"img_size": 72}),  # the full stem needs a multiple of 16
    ("ceit_tiny", {"img_size": 100}),
])
def test_impossible_image_size_raises_value_error(name, kwargs):
    img_size = kwargs.pop("img_size")
    with pytest.raises(ValueError, match=f"img_size.*{img_size}|{img_size}.*img_size"):
        build(name, img_size, 3, **kwargs)


@pytest.mark.parametrize("name", TINY)
def test_wrong_input_geometry_raises_value_error(name):
    model = build(name, 32, 3)
    with pytest.raises(ValueError, match="built for input"):
        model(images(1, 3, 28))
    with pytest.raises(ValueError, match="built for input"):
        model(images(1, 1, 32))


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny", {"depth": 6}),
    ("vit_tiny", {"drop_path": 0.1}),  # a typo of drop_path_rate must not pass silently
    ("ceit_tiny", {"patch_size": 4}),
    ("ceit_small", {"foo": 1}),
])
def test_unknown_kwargs_raise_type_error(name, kwargs):
    with pytest.raises(TypeError, match="unexpected keyword"):
        build(name, 32, 3, **kwargs)


# ---------------------------------------------------------------- the authors' bugs: chaining and q/k/v


@pytest.mark.parametrize("name", TINY)
def test_blocks_are_chained(name):
    """Each block's output is the next block's input, and the last one reaches the logits."""
    model = build(name, 28, 1).eval()
    inputs, outputs = [], []

    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    hooks = [block.register_forward_hook(record) for block in model.blocks]
    with torch.no_grad():
        logits = model(images(2, 1, 28))
        for hook in hooks:
            hook.remove()
        assert len(outputs) == 12
        for index in range(11):
            assert torch.equal(inputs[index + 1], outputs[index])
        if name.startswith("vit"):
            expected = model.head(model.norm(outputs[-1][:, 0]))
        else:
            class_tokens = torch.stack([out[:, 0] for out in outputs], dim=1)
            expected = model.head(model.norm(model.lca(class_tokens)))
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("name", TINY)
def test_first_block_affects_the_output(name):
    """Unchained blocks (the authors' bug) would make every block but the last irrelevant."""
    model = build(name, 28, 1).eval()
    x = images(2, 1, 28)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].attn.q.weight.add_(0.5 * torch.randn_like(model.blocks[0].attn.q.weight))
        after_q = model(x)
        feed_forward = model.blocks[0].mlp if name.startswith("vit") else model.blocks[0].leff
        for param in feed_forward.parameters():
            param.add_(0.5 * torch.randn_like(param))
        after_feed_forward = model(x)
    assert (before - after_q).abs().max() > 1e-4
    assert (after_q - after_feed_forward).abs().max() > 1e-4


@pytest.mark.parametrize("name", TINY)
def test_q_k_v_are_separate_parameters(name):
    model = build(name, 32, 3)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attentions) == (12 if name.startswith("vit") else 13)  # CeiT: 12 layers + LCA
    for attention in attentions:
        weights = [attention.q.weight, attention.k.weight, attention.v.weight]
        assert all(w.shape == (192, 192) for w in weights)
        assert len({w.data_ptr() for w in weights}) == 3
        assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert not any(p.shape[0] == 3 * 192 for p in model.parameters() if p.ndim == 2)


def test_attention_matches_hand_computation():
    """softmax(q k^T / sqrt(d)) v per head, with q from the queries and k, v from the context."""
    torch.manual_seed(0)
    attention = Attention(dim=8, num_heads=2).eval()
    x, context = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    q, k, v = attention.q(x), attention.k(context), attention.v(context)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(4)
        heads.append(scores.softmax(-1) @ v[..., part])
    expected = attention.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attention(x, context), expected)
    torch.testing.assert_close(attention(x), attention(x, x))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("name", TINY + ["ceit"])
def test_every_parameter_receives_a_gradient(name):
    model = build(name, 28, 1).train()
    logits = model(images(2, 1, 28))
    F.cross_entropy(logits, torch.tensor([0, 5])).backward()
    names = [n for n, _ in model.named_parameters()]
    if name == "ceit_tiny":
        assert any(n.startswith("lca.attn.") for n in names) and any(n.startswith("lca.mlp.") for n in names)
        assert "lca.layer_embed" in names
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


# ---------------------------------------------------------------- CeiT specifics


@pytest.mark.parametrize("index", [0, -1])  # a layer with LeFF, and the last one (without)
def test_ceit_class_token_takes_leffs_identity_path(index):
    """As in the official CeiT release, LeFF passes the class token through, so the layer's residual
    update of the class token is LN2(cls); LeFF's own weights never touch it."""
    model = build("ceit_tiny", 32, 3).eval()
    block = model.blocks[index]
    x = torch.randn(2, 1 + 64, 192, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for param in block.norm2.parameters():  # away from the identity initialisation
            param.add_(torch.randn_like(param))
        out = block(x)
        after_attention = x + block.attn(block.norm1(x))
        torch.testing.assert_close(out[:, 0], after_attention[:, 0] + block.norm2(after_attention)[:, 0])
        if block.leff is not None:
            for param in block.leff.parameters():
                param.add_(torch.randn_like(param))
            changed = block(x)
            assert torch.equal(changed[:, 0], out[:, 0])
            assert (changed[:, 1:] - out[:, 1:]).abs().max() > 1e-3


def test_ceit_layer_embedding_starts_at_zero_and_is_decayed():
    """LCA's per-layer embedding (the official pos_layer_embed) is zero-initialised and not exempt from
    weight decay; the position embedding and class token are exempt, as in DeiT and the official CeiT."""
    model = build("ceit_tiny", 32, 3)
    assert torch.equal(model.lca.layer_embed, torch.zeros_like(model.lca.layer_embed))
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_ceit_last_layer_has_no_dead_leff():
    """The last layer's patch tokens are read by nothing, so it carries no LeFF (whose gradient would be 0)."""
    model = build("ceit_tiny", 32, 3)
    assert all(block.leff is not None for block in model.blocks[:-1])
    assert model.blocks[-1].leff is None


def test_ceit_lca_uses_every_layers_class_token():
    """The output depends on each layer's class token, and only the last one is the query."""
    model = build("ceit_tiny", 32, 3).eval()
    tokens = torch.randn(2, 12, 192, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out = model.lca(tokens)
    assert out.shape == (2, 192)
    out.sum().backward()
    assert (tokens.grad.abs().sum(-1) > 0).all()  # every layer's class token influences the result
    with torch.no_grad():
        # The residual stream is the last class token: zero attention/MLP output leaves it (plus its
        # layer embedding) unchanged.
        for param in [model.lca.attn.proj.weight, model.lca.attn.proj.bias, model.lca.mlp.fc2.weight,
                      model.lca.mlp.fc2.bias]:
            param.zero_()
        torch.testing.assert_close(model.lca(tokens), tokens[:, -1] + model.lca.layer_embed[:, -1])


# ---------------------------------------------------------------- stochastic depth and dropout


def test_drop_path_module():
    drop = DropPath(0.5).train()
    x = torch.ones(1000, 3, 2)
    torch.manual_seed(0)
    out = drop(x)
    per_sample = out.reshape(1000, -1)
    kept = per_sample[:, 0] > 0
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # whole samples, rescaled by 1/0.5
    assert 400 < kept.sum() < 600
    assert drop.eval()(x) is x


@pytest.mark.parametrize("name", TINY)
def test_drop_path_schedule_is_linear(name):
    model = build(name, 32, 3, drop_path_rate=0.22)
    rates = [block.drop_path.rate for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.22)
    assert all(later - earlier == pytest.approx(0.02) for earlier, later in itertools.pairwise(rates))


@pytest.mark.parametrize("name", TINY)
def test_drop_path_identity_in_eval_active_in_train(name):
    x = images(2, 3, 32)
    model = build(name, 32, 3, drop_path_rate=0.5, drop_rate=0.3)
    with torch.no_grad():
        model.eval()
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        assert torch.equal(model(x), first)

        model.train()
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        assert not torch.allclose(model(x), first)

        # Without drop path or dropout, training mode is deterministic too: the randomness above is theirs.
        plain = build(name, 32, 3).train()
        torch.manual_seed(1)
        first = plain(x)
        torch.manual_seed(2)
        assert torch.equal(plain(x), first)


# ---------------------------------------------------------------- the competitive-distillation authors' networks
# Their code: github.com/XiaoleiDiao/Competitive-Distillation at commit 298039f (models/vit.py, models/CeiT.py,
# models/component_.py).


def test_authors_vit_dropout_sits_where_theirs_does():
    """Their one rate, 0.1: after the position embedding, on the attention probabilities, after the attention
    output and after the MLP's second Linear; none in the MLP's hidden layer. No bias on q, k, v and output."""
    with torch.device("meta"):
        model = build("vit", 32, 3)
        other_rate = build("vit", 32, 3, drop_rate=0.2)
    assert model.pos_drop.p == 0.1
    for block in model.blocks:
        assert block.attn.attn_drop_rate == 0.1 and block.attn.proj_drop.p == 0.1
        assert isinstance(block.mlp.hidden_drop, torch.nn.Identity) and block.mlp.drop.p == 0.1
        assert all(layer.bias is None for layer in (block.attn.q, block.attn.k, block.attn.v, block.attn.proj))
    assert other_rate.pos_drop.p == 0.2 and other_rate.blocks[5].attn.attn_drop_rate == 0.2
    assert other_rate.blocks[5].mlp.drop.p == 0.2 and isinstance(other_rate.blocks[5].mlp.hidden_drop, torch.nn.Identity)
    # DeiT's variants keep DeiT's dropout: the MLP's hidden layer too, not the attention probabilities.
    with torch.device("meta"):
        deit = build("vit_base", 32, 3, drop_rate=0.1)
    assert deit.blocks[0].mlp.hidden_drop.p == 0.1 and deit.blocks[0].attn.attn_drop_rate == 0.0
    assert deit.blocks[0].attn.q.bias is not None


def test_attention_dropout_drops_probabilities():
    """With every value vector equal to c, each query's output is c times the sum of its kept, rescaled
    probabilities: a multiple of c per head (dropout on the output would zero single entries instead)."""
    torch.manual_seed(0)
    attention = Attention(dim=8, num_heads=2, attn_drop_rate=0.5)
    c = torch.arange(1.0, 9.0)
    with torch.no_grad():
        attention.v.weight.zero_()
        attention.v.bias.copy_(c)
        attention.proj.weight.copy_(torch.eye(8))
        attention.proj.bias.zero_()
    x = torch.randn(4, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(attention.eval()(x), c.expand(4, 6, 8))
        out = attention.train()(x)
    factors = (out / c).reshape(4, 6, 2, 4)  # (batch, query, head, head_dim)
    torch.testing.assert_close(factors, factors[..., :1].expand_as(factors))
    assert (factors[..., 0] - 1).abs().max() > 0.1


def test_authors_vit_mlp_hidden_layer_is_not_dropped():
    """In training the MLP's output entries are either dropped (0) or the eval output scaled by 1 / 0.9:
    nothing before fc2 was dropped."""
    with torch.device("meta"):  # only one MLP is needed: build the 86 M-parameter model without memory
        mlp = build("vit", 32, 3).blocks[0].mlp
    mlp = mlp.to_empty(device="cpu")
    torch.manual_seed(0)
    for param in mlp.parameters():
        torch.nn.init.normal_(param, std=0.05)
    x = torch.randn(2, 5, 768)
    with torch.no_grad():
        expected = mlp.eval()(x) / 0.9
        out = mlp.train()(x)
    kept = out != 0
    assert 0.8 < kept.float().mean() < 0.97
    torch.testing.assert_close(out[kept], expected[kept])


def test_authors_ceit_layers():
    """Their TransformerLeFF layer: q, k, v without bias (to_qkv, bias=False), output projection with
    one; LeFF = Linear + BN1d + GELU, depthwise conv without bias + BN2d + GELU, Linear + BN1d + GELU, no
    dropout; a 32-channel stem and no LCA. The official CeiT keeps its own LeFF (no final GELU)."""
    model = build("ceit", 32, 3)
    assert model.i2t.conv.out_channels == 32 and model.lca is None
    for block in model.blocks:
        assert block.class_token_skips_leff
        assert block.attn.q.bias is None and block.attn.k.bias is None and block.attn.v.bias is None
        assert block.attn.proj.bias is not None and block.attn.attn_drop_rate == 0.0
    for block in model.blocks[:-1]:
        leff = block.leff
        assert isinstance(leff.project_bn, torch.nn.BatchNorm1d) and isinstance(leff.output_act, torch.nn.GELU)
        assert leff.depthwise.bias is None and leff.drop.p == 0.0
    # The last layer's LeFF stage (LayerNorm included) cannot reach the logits, so it is left out.
    assert model.blocks[-1].leff is None and model.blocks[-1].norm2 is None
    # drop_rate does not reach their LeFF, which has no dropout.
    assert build("ceit", 32, 3, drop_rate=0.3).blocks[0].leff.drop.p == 0.0
    official = build("ceit_tiny", 32, 3).blocks[0]
    assert isinstance(official.leff.output_act, torch.nn.Identity) and official.leff.depthwise.bias is not None
    assert official.attn.q.bias is not None and not official.class_token_skips_leff
    # Functionally: their LeFF ends in a GELU, whose outputs are never below its minimum, -0.17.
    patches = torch.randn(2, 64, 192, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert model.blocks[0].leff.train()(patches).min() >= -0.17
        assert official.leff.train()(patches).min() < -1


@pytest.mark.parametrize("index", [0, 5, -1])  # layers with LeFF, and the last one (without)
def test_authors_ceit_class_token_skips_leff(index):
    """Their layer: x = leff(x[:, 1:]); x = cat(cls, x). The class token leaves the layer exactly as
    attention left it (not cls + LN2(cls) as in the official release); LeFF changes only the patches."""
    model = build("ceit", 32, 3).train()  # train mode: their BatchNorms see the batch
    block = model.blocks[index]
    x = torch.randn(2, 1 + 64, 192, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        after_attention = x + block.attn(block.norm1(x))
        out = block(x)
        assert torch.equal(out[:, 0], after_attention[:, 0])
        if block.leff is None:
            assert torch.equal(out, after_attention)
            return
        for param in [*block.norm2.parameters(), *block.leff.parameters()]:
            param.add_(torch.randn_like(param))
        changed = block(x)
    assert torch.equal(changed[:, 0], out[:, 0])
    assert (changed[:, 1:] - out[:, 1:]).abs().max() > 1e-3
    # The patch tokens take the pre-norm LeFF stage with its residual: patches + LeFF(LN2(patches)).
    torch.testing.assert_close(changed[:, 1:], after_attention[:, 1:] + block.leff(block.norm2(after_attention[:, 1:])))


# ---------------------------------------------------------------- parameter counts

# DeiT's published counts at 224 px and 1000 classes (timm's deit_*_patch16_224): exact.
DEIT_PARAMS = {"vit_tiny": 5_717_416, "vit_small": 22_050_664, "vit_base": 86_567_656}
# CeiT paper, Table 2 (millions, one decimal).
CEIT_PAPER_MILLIONS = {"ceit_tiny": 6.4, "ceit_small": 24.2, "ceit_base": 94.4}


@pytest.mark.parametrize("name", VITS)
def test_vit_parameter_count_matches_deit(name):
    with torch.device("meta"):  # counting needs no memory or initialisation time
        model = build(name, 224, 3, num_classes=1000)
    assert count(model) == DEIT_PARAMS[name]


@pytest.mark.parametrize("name", CEITS)
def test_ceit_parameter_count_matches_paper(name):
    """Matches the paper once the last layer's LeFF (which cannot reach the logits) is counted back in."""
    with torch.device("meta"):
        model = build(name, 224, 3, num_classes=1000)
    dead_leff = count(model.blocks[0].leff) + count(model.blocks[0].norm2)  # omitted from the last layer
    assert round((count(model) + dead_leff) / 1e6, 1) == CEIT_PAPER_MILLIONS[name]


# The authors' CeiT(224, 4, 100), their CIFAR-100 network, counted from their definitions (models/CeiT.py and
# models/component_.py at 298039f): stem Conv2d(3, 32, 7) with bias 4,736, BatchNorm2d(32) 64, patch
# Linear(32*4*4, 192) 98,496, positions 197*192 = 37,824, class token 192; each of 12 layers: LayerNorm 384,
# to_qkv 192*576 = 110,592 (no bias), to_out 192*192 + 192 = 37,056, LayerNorm 384, LeFF 306,240 (up 192*768 + 768
# = 148,224, BN 1,536, depthwise 768*9 = 6,912 without bias, BN 1,536, down 768*192 + 192 = 147,648, BN 384):
# 454,656; head LayerNorm 384 + Linear 192*100 + 100 = 19,300. Sum 5,616,868 (their utils.py notes torchsummary's
# 5,578,852, which does not see the class token and positions: 5,616,868 - 38,016).
AUTHORS_CEIT_PARAMS = 5_616_868
# The authors' ViT(224, 100) (models/vit.py at 298039f): patch Conv2d(3, 768, 16) 590,592, class token 768,
# positions 197*768 = 151,296; each of 12 blocks: LayerNorm 1,536, qkv_weights 768*768 = 589,824 (one projection
# shared by q, k, v; no bias), dense 589,824 (no bias), LayerNorm 1,536, MLP 768*3072 + 3072 + 3072*768 + 768 =
# 4,722,432: 5,905,152; LayerNorm 1,536, head 768*100 + 100 = 76,900. Sum 71,682,916 (their utils.py notes
# torchsummary's 85,705,060, which counts the shared projection thrice and the shared LayerNorm twice per block
# and does not see the class token and positions).
AUTHORS_VIT_PARAMS = 71_682_916


def test_authors_ceit_parameter_count():
    """The authors' count less what cannot change the logits: the stem conv's bias (BatchNorm cancels it,
    32) and the last layer's LeFF stage (LayerNorm 384 + LeFF 306,240; its patch tokens are read by nothing)."""
    with torch.device("meta"):
        model = build("ceit", 224, 3, num_classes=100)
    leff_stage = count(model.blocks[0].norm2) + count(model.blocks[0].leff)
    assert (count(model.blocks[0].norm2), count(model.blocks[0].leff)) == (384, 306_240)
    assert count(model.blocks[0]) == 454_656 and count(model.blocks[-1]) == 454_656 - leff_stage
    assert count(model.i2t) == 4_736 - 32 + 64 + 98_496
    assert count(model) == AUTHORS_CEIT_PARAMS - 32 - leff_stage == 5_310_212


def test_authors_vit_parameter_count():
    """The authors' count plus the bug fix: separate key and value projections (768*768 each, 12 blocks)."""
    with torch.device("meta"):
        model = build("vit", 224, 3, num_classes=100)
    assert count(model.blocks[0]) == 5_905_152 + 2 * 768 * 768
    assert count(model) == AUTHORS_VIT_PARAMS + 12 * 2 * 768 * 768 == 85_838_692
