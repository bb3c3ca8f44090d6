"""Vision Transformer (Dosovitskiy et al. 2021) in the DeiT configuration (Touvron et al. 2021).

A pre-norm transformer over non-overlapping image patches, classified from a class token.
Two bugs of the competitive-distillation authors' ViT are fixed here: the blocks are chained (each
block's output is the next block's input; theirs applied every block to the embedding, so only the
last one mattered), and queries, keys and values have separate projections (theirs shared one).
`vit_*` are DeiT's variants; `authors_vit` (registry name `vit`) is the authors' ViT-Base.

The building blocks (DropPath, Attention, Mlp, init_transformer_weights, check_input, ...) are reused
by models/ceit.py.
"""

import torch
import torch.nn.functional as F
from torch import nn

# DeiT Table 1: (embedding dim, heads); depth 12 and MLP ratio 4 for every variant.
VARIANTS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}
DEPTH = 12
MLP_RATIO = 4
# DeiT/timm use eps 1e-6 in every LayerNorm (PyTorch's default is 1e-5).
LAYER_NORM_EPS = 1e-6
# DeiT initialises linear layers, position embeddings and the class token with timm's
# trunc_normal_(std=0.02), whose default cut-offs are +-2 in absolute units, i.e. 100 standard
# deviations: in effect a plain N(0, 0.02^2).
INIT_STD = 0.02


def normal_init(tensor):
    """Fill `tensor` in place from N(0, 0.02^2) (DeiT's initialisation, see INIT_STD)."""
    with torch.no_grad():
        tensor.normal_(0.0, INIT_STD)


def init_transformer_weights(module):
    """DeiT initialisation for one module: truncated-normal linear weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        normal_init(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_rate(name, value):
    """Raise ValueError unless `value` is a probability usable as a drop rate, in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_input(x, in_chans, img_size, model_name):
    """Raise ValueError unless x is (B, in_chans, img_size, img_size), the geometry the model was built for."""
    if x.ndim != 4 or x.shape[1] != in_chans or x.shape[2] != img_size or x.shape[3] != img_size:
        raise ValueError(
            f"{model_name} was built for input (B, {in_chans}, {img_size}, {img_size}), got {tuple(x.shape)}"
        )


def drop_path_schedule(drop_path_rate, depth):
    """Per-block stochastic-depth rates rising linearly from 0 to drop_path_rate (Huang et al. 2016, DeiT)."""
    if depth == 1:
        return [drop_path_rate]
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


def default_patch_size(img_size):
    """Patch size for an image size: 4 for small images (<= 64 px), 16 from 128 px (ViT/DeiT), else 8."""
    if img_size <= 64:
        return 4  # 32 px -> 8x8 patches, 28 px -> 7x7: a grid comparable to 224 px / 16 = 14x14
    if img_size >= 128:
        return 16
    return 8


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a random subset of samples."""

    def __init__(self, rate=0.0):
        super().__init__()
        check_rate("drop_path_rate", rate)
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        # One Bernoulli draw per sample; dividing by keep_prob keeps the expected output unchanged,
        # so evaluation (where the branch is always kept) needs no rescaling.
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self):
        return f"rate={self.rate}"


class Attention(nn.Module):
    """Multi-head scaled dot-product attention with separate query, key and value projections."""

    def __init__(self, dim, num_heads, drop_rate=0.0, *, attn_drop_rate=0.0, qkv_bias=True, proj_bias=True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        check_rate("attn_drop_rate", attn_drop_rate)
        self.num_heads = num_heads
        # Three independent projections: a single shared one (the authors' bug) makes q = k = v.
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop_rate = attn_drop_rate  # dropout on the attention probabilities (training only)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(drop_rate)

    def _split_heads(self, x):
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, x, context=None):
        """Attend from the tokens of x (queries) to those of `context` (keys, values; default x)."""
        context = x if context is None else context
        q = self._split_heads(self.q(x))
        k = self._split_heads(self.k(context))
        v = self._split_heads(self.v(context))
        # softmax(q k^T / sqrt(head_dim)) v, fused where the backend allows it; dropout_p drops
        # attention probabilities after the softmax, as nn.Dropout on them would.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop_rate if self.training else 0.0)
        batch, _, tokens, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self):
        return f"attn_drop_rate={self.attn_drop_rate}"


class Mlp(nn.Module):
    """Transformer feed-forward network: Linear, GELU, Linear (ViT eq. 3), dropout after each Linear."""

    def __init__(self, dim, hidden_dim, drop_rate=0.0, *, hidden_dropout=True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        # DeiT/timm drop the hidden activations too; the competitive-distillation authors' ViT does not.
        self.hidden_drop = nn.Dropout(drop_rate) if hidden_dropout else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x):
        x = self.hidden_drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)) (ViT eqs. 2-3)."""

    def __init__(self, dim, num_heads, mlp_ratio=MLP_RATIO, drop_rate=0.0, drop_path_rate=0.0, *,
                 attn_drop_rate=0.0, hidden_dropout=True, attn_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, drop_rate, attn_drop_rate=attn_drop_rate, qkv_bias=attn_bias,
                              proj_bias=attn_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio, drop_rate, hidden_dropout=hidden_dropout)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patch x patch squares and project each to a token."""

    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(
                f"ViT needs img_size divisible by the patch size: img_size {img_size} is not a multiple "
                f"of patch_size {patch_size} (choose an --img-size that is a multiple of {patch_size})"
            )
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        # A convolution with kernel = stride = patch is the linear patch projection of ViT eq. 1.
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        # (B, dim, grid, grid) -> (B, grid*grid, dim), patches in row-major order.
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT classifier: patch tokens + class token + learned positions, chained pre-norm blocks, class-token head.

    Dropout at drop_rate after the position embedding, the attention output and both MLP layers (DeiT);
    attn_drop_rate drops attention probabilities; hidden_dropout=False spares the MLP's hidden layer and
    attn_bias=False removes the biases of the q, k, v and output projections (the authors' `vit`)."""

    def __init__(self, *, num_classes, img_size, in_chans, dim, num_heads, depth=DEPTH, mlp_ratio=MLP_RATIO,
                 patch_size=None, drop_rate=0.0, drop_path_rate=0.0, attn_drop_rate=0.0, hidden_dropout=True,
                 attn_bias=True):
        super().__init__()
        if img_size < 1 or in_chans < 1:
            raise ValueError(f"img_size and in_chans must be positive, got {img_size} and {in_chans}")
        check_rate("drop_rate", drop_rate)
        check_rate("drop_path_rate", drop_path_rate)
        self.img_size = img_size
        self.in_chans = in_chans
        self.patch_size = default_patch_size(img_size) if patch_size is None else patch_size
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")

        self.patch_embed = PatchEmbed(img_size, self.patch_size, in_chans, dim)
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, drop_rate, rate, attn_drop_rate=attn_drop_rate,
                  hidden_dropout=hidden_dropout, attn_bias=attn_bias)
            for rate in drop_path_schedule(drop_path_rate, depth)
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(dim, num_classes)

        normal_init(self.pos_embed)
        normal_init(self.cls_token)
        self.apply(init_transformer_weights)

    def no_weight_decay(self):
        """Parameter names that the DeiT recipe excludes from weight decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"}

    def forward(self, x):
        check_input(x, self.in_chans, self.img_size, type(self).__name__)
        tokens = self.patch_embed(x)
        cls_token = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls_token, tokens], dim=1) + self.pos_embed)
        for block in self.blocks:  # chained: each block refines the previous block's output
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def check_kwargs(model_name, kwargs, accepted):
    """Raise TypeError naming the accepted options if kwargs holds any other key."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{model_name} got unexpected keyword arguments {unknown}; accepted: {sorted(accepted)}")


def _vit(variant, num_classes, img_size, in_chans, **kwargs):
    # Only the documented options: depth, dim and heads are fixed by the variant's name.
    check_kwargs(f"vit_{variant}", kwargs, ("patch_size", "drop_rate", "drop_path_rate"))
    dim, num_heads = VARIANTS[variant]
    return VisionTransformer(num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                             dim=dim, num_heads=num_heads, **kwargs)


def vit_tiny(*, num_classes, img_size, in_chans, **kwargs):
    """ViT-Tiny (DeiT-Ti): dim 192, 12 blocks, 3 heads; kwargs: patch_size, drop_rate, drop_path_rate."""
    return _vit("tiny", num_classes, img_size, in_chans, **kwargs)


def vit_small(*, num_classes, img_size, in_chans, **kwargs):
    """ViT-Small (DeiT-S): dim 384, 12 blocks, 6 heads; kwargs: patch_size, drop_rate, drop_path_rate."""
    return _vit("small", num_classes, img_size, in_chans, **kwargs)


def vit_base(*, num_classes, img_size, in_chans, **kwargs):
    """ViT-Base (DeiT-B): dim 768, 12 blocks, 12 heads; kwargs: patch_size, drop_rate, drop_path_rate."""
    return _vit("base", num_classes, img_size, in_chans, **kwargs)


def authors_vit(*, num_classes, img_size, in_chans, **kwargs):
    """The competitive-distillation authors' `vit`: their ViT-Base with its two bugs fixed (module docstring).

    Its layers, as in models/vit.py of XiaoleiDiao/Competitive-Distillation (commit 298039f): dim 768,
    12 blocks, 12 heads, MLP 3072, 16x16 patches at every input size (a 2x2 grid at 32 px; they trained
    CIFAR-100 at 224 px); q/k/v and output projections without bias (their `qkv_weights` and `dense`);
    one dropout rate, 0.1, after the position embedding, on the attention probabilities, after the
    attention output and after the MLP's second Linear, none in the MLP's hidden layer.
    Kept from DeiT: the standard pre-norm block (their block re-normalises the attention sublayer with a
    second LayerNorm inside their MultiHeadAttention and uses one LayerNorm before both sublayers; the
    parameter count is the same), LayerNorm eps 1e-6 (theirs 1e-5) and DeiT's initialisation.
    kwargs: patch_size, drop_rate (that one rate), drop_path_rate."""
    check_kwargs("vit", kwargs, ("patch_size", "drop_rate", "drop_path_rate"))
    options = {"patch_size": 16, "drop_rate": 0.1, **kwargs}
    dim, num_heads = VARIANTS["base"]
    return VisionTransformer(num_classes=num_classes, img_size=img_size, in_chans=in_chans, dim=dim,
                             num_heads=num_heads, attn_drop_rate=options["drop_rate"], hidden_dropout=False,
                             attn_bias=False, **options)
