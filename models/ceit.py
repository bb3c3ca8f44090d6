"""CeiT: "Incorporating Convolution Designs into Visual Transformers" (Yuan et al., ICCV 2021).

Three changes to ViT/DeiT, one per section of the paper:
- Image-to-Tokens (sec. 3.1): a small convolutional stem makes the tokens from low-level features
  instead of raw pixel patches.
- Locally-enhanced Feed-Forward (sec. 3.2): the feed-forward layer gets a depthwise 3x3 convolution
  over the patch tokens laid out on their 2-D grid; the class token has no place on the grid and is
  passed through, so, as in the official release (coeusguo/ceit), its residual update is its own
  layer-normed value: cls + LN2(cls).
- Layer-wise Class-token Attention (sec. 3.3): the last layer's class token attends over the class
  tokens of all layers, and that result is classified.
Unlike the competitive-distillation authors' version, forward returns logits only (theirs returned a
tuple), and the token grid is computed from img_size (never a fixed 14x14). Their network is `ceit`
(authors_ceit): CeiT-T with a 32-channel I2T stem, no LCA, and their own encoder layer, in which the
class token skips the LeFF stage altogether (CeiTBlock's authors_layer).
"""
import torch
from torch import nn

from .vit import (
    DEPTH,
    LAYER_NORM_EPS,
    MLP_RATIO,
    VARIANTS,
    Attention,
    DropPath,
    Mlp,
    check_input,
    check_kwargs,
    check_rate,
    drop_path_schedule,
    init_transformer_weights,
    normal_init,
)

# Output channels of the I2T convolution: 64 as in the official CeiT release (Yuan et al.); with it
# the model matches the paper's parameter counts (6.4M / 24.2M / 94.4M, counting the last layer's
# LeFF). The competitive-distillation authors' `ceit` used 32.
STEM_CHANNELS = 64
TOKEN_PATCH = 4  # I2T cuts its feature map into 4x4 patches (sec. 3.1)
SMALL_IMAGE = 64  # up to this size the stem keeps full resolution so that a token grid remains


class ImageToTokens(nn.Module):
    """I2T stem (sec. 3.1): conv 7x7 + BN + max-pool, then 4x4 patches of the feature map become tokens."""

    def __init__(self, img_size, in_chans, dim, channels=STEM_CHANNELS):
        super().__init__()
        if img_size > SMALL_IMAGE:
            # The paper's stem: conv stride 2 and max-pool stride 2 downsample 4x, then 4x4 patches,
            # 16x in all, the same token count as ViT's 16x16 patches (224 -> 112 -> 56 -> 14x14).
            stride, pool, reduction = 2, True, 16
        else:
            # At 32 px the paper's stem would leave a 2x2 grid; keep full resolution instead
            # (stride 1, no pool) so that 4x4 patches give 32 -> 8x8 tokens, as ViT with patch 4.
            stride, pool, reduction = 1, False, TOKEN_PATCH
        if img_size % reduction != 0:
            raise ValueError(
                f"CeiT's Image-to-Tokens stem reduces {img_size} px images {reduction}x "
                f"({'conv stride 2, max-pool, 4x4 patches' if pool else '4x4 patches'}), so img_size must "
                f"be a multiple of {reduction} at this size; got {img_size}"
            )
        self.grid_size = img_size // reduction
        self.num_patches = self.grid_size**2
        # No bias: BatchNorm follows and would cancel it. No activation: the paper's I2T is
        # MaxPool(BN(Conv(x))).
        self.conv = nn.Conv2d(in_chans, channels, kernel_size=7, stride=stride, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if pool else nn.Identity()
        self.proj = nn.Conv2d(channels, dim, kernel_size=TOKEN_PATCH, stride=TOKEN_PATCH)

    def forward(self, x):
        x = self.pool(self.bn(self.conv(x)))
        # (B, dim, grid, grid) -> (B, grid*grid, dim), tokens in row-major order; LeFF relies on it.
        return self.proj(x).flatten(2).transpose(1, 2)


class LocallyEnhancedFeedForward(nn.Module):
    """LeFF (sec. 3.2): expand, depthwise 3x3 conv over the token grid, project; BN after each step.

    output_gelu adds a GELU after the last BN and depthwise_bias=False drops the depthwise conv's bias
    (BN follows it): both as in the competitive-distillation authors' LeFF."""

    def __init__(self, dim, grid_size, mlp_ratio=MLP_RATIO, drop_rate=0.0, *, output_gelu=False, depthwise_bias=True):
        super().__init__()
        hidden_dim = dim * mlp_ratio
        self.grid_size = grid_size
        self.expand = nn.Linear(dim, hidden_dim)
        self.expand_bn = nn.BatchNorm1d(hidden_dim)
        # groups=channels: each channel mixes only with its 3x3 spatial neighbourhood (the "local" part).
        self.depthwise = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim,
                                   bias=depthwise_bias)
        self.depthwise_bn = nn.BatchNorm2d(hidden_dim)
        self.project = nn.Linear(hidden_dim, dim)
        self.project_bn = nn.BatchNorm1d(dim)
        self.act = nn.GELU()
        self.output_act = nn.GELU() if output_gelu else nn.Identity()
        self.drop = nn.Dropout(drop_rate)

    def forward(self, patches):
        """Map patch tokens (B, grid*grid, dim) to (B, grid*grid, dim); the class token must not be included."""
        batch = patches.shape[0]
        # BatchNorm1d normalises dim 1, so channels go there: (B, tokens, C) -> (B, C, tokens).
        x = self.act(self.expand_bn(self.expand(patches).transpose(1, 2)))
        # Spatial restore: the row-major token order of ImageToTokens back onto the 2-D grid.
        x = x.reshape(batch, -1, self.grid_size, self.grid_size)
        x = self.act(self.depthwise_bn(self.depthwise(x)))
        x = self.project(x.flatten(2).transpose(1, 2))
        x = self.output_act(self.project_bn(x.transpose(1, 2))).transpose(1, 2)
        return self.drop(x)


class CeiTBlock(nn.Module):
    """CeiT encoder layer: pre-norm self-attention over all tokens, then pre-norm LeFF on the patch tokens.

    authors_layer=True gives the competitive-distillation authors' layer (XiaoleiDiao/Competitive-
    Distillation, commit 298039f: TransformerLeFF in models/CeiT.py, Attention and LeFF in
    models/component_.py): the class token skips the LeFF stage (its LayerNorm, LeFF and residual add)
    and leaves the layer as attention left it; q, k and v have no bias; LeFF ends in BN + GELU, has no
    depthwise bias and no dropout."""

    def __init__(self, dim, num_heads, grid_size, mlp_ratio=MLP_RATIO, drop_rate=0.0, drop_path_rate=0.0,
                 with_leff=True, authors_layer=False):
        super().__init__()
        self.class_token_skips_leff = authors_layer
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, drop_rate, qkv_bias=not authors_layer)
        self.drop_path = DropPath(drop_path_rate)
        # The authors' class token never reaches norm2, so a layer without LeFF has no use for it.
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS) if with_leff or not authors_layer else None
        self.leff = None
        if with_leff:
            leff_options = dict(output_gelu=True, depthwise_bias=False) if authors_layer else {}
            self.leff = LocallyEnhancedFeedForward(dim, grid_size, mlp_ratio, 0.0 if authors_layer else drop_rate,
                                                   **leff_options)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if self.class_token_skips_leff:
            # The authors' layer: x = leff(x[:, 1:]); x = cat(cls, x), with the LeFF stage's LayerNorm and
            # residual inside their `leff`, so only the patch tokens change.
            if self.leff is None:
                return x
            patches = x[:, 1:]
            return torch.cat([x[:, :1], patches + self.drop_path(self.leff(self.norm2(patches)))], dim=1)
        normed = self.norm2(x)
        # Sec. 3.2: LeFF maps the patch tokens on their grid and passes the class token through, so the
        # residual update of the class token is LN2(cls) itself (the official release does the same).
        # Without a LeFF (a last layer whose patch tokens nobody reads) only the class token changes.
        if self.leff is None:
            return torch.cat([x[:, :1] + self.drop_path(normed[:, :1]), x[:, 1:]], dim=1)
        return x + self.drop_path(torch.cat([normed[:, :1], self.leff(normed[:, 1:])], dim=1))


class LayerClassAttention(nn.Module):
    """LCA (sec. 3.3): one pre-norm block in which the last class token attends over every layer's class token."""

    def __init__(self, dim, num_heads, depth, mlp_ratio=MLP_RATIO, drop_rate=0.0):
        super().__init__()
        # A learned embedding per layer, as in the official CeiT release (its pos_layer_embed: zero
        # initialised and weight-decayed there and here): attention is permutation-invariant over
        # its keys, so without it LCA could not tell the layers apart.
        self.layer_embed = nn.Parameter(torch.zeros(1, depth, dim))
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, drop_rate)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio, drop_rate)
        # No stochastic depth here (as in the authors' release): dropping this branch would skip LCA.

    def forward(self, class_tokens):
        """Map the stacked class tokens (B, depth, dim), first layer first, to one token (B, dim)."""
        tokens = class_tokens + self.layer_embed
        normed = self.norm1(tokens)
        # Only the last layer's token is a query (one output token); all depth tokens are keys/values.
        x = tokens[:, -1:] + self.attn(normed[:, -1:], context=normed)
        x = x + self.mlp(self.norm2(x))
        return x[:, 0]


class CeiT(nn.Module):
    """CeiT classifier: I2T tokens + class token + learned positions, chained LeFF blocks, LCA, head.

    authors_layers=True builds every layer as the competitive-distillation authors' (CeiTBlock)."""

    def __init__(self, *, num_classes, img_size, in_chans, dim, num_heads, depth=DEPTH, mlp_ratio=MLP_RATIO,
                 drop_rate=0.0, drop_path_rate=0.0, stem_channels=STEM_CHANNELS, lca=True, authors_layers=False):
        super().__init__()
        if img_size < 1 or in_chans < 1:
            raise ValueError(f"img_size and in_chans must be positive, got {img_size} and {in_chans}")
        check_rate("drop_rate", drop_rate)
        check_rate("drop_path_rate", drop_path_rate)
        self.img_size = img_size
        self.in_chans = in_chans

        self.i2t = ImageToTokens(img_size, in_chans, dim, stem_channels)
        self.grid_size = self.i2t.grid_size
        self.num_patches = self.i2t.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_schedule(drop_path_rate, depth)
        # The last layer gets no LeFF: its output patch tokens are read by nothing (LCA and the head
        # read class tokens), so a LeFF there could never affect the logits or get a gradient.
        self.blocks = nn.ModuleList(
            CeiTBlock(dim, num_heads, self.grid_size, mlp_ratio, drop_rate, rate, with_leff=index < depth - 1,
                      authors_layer=authors_layers)
            for index, rate in enumerate(rates)
        )
        # Without LCA the last layer's class token is classified, as in ViT.
        self.lca = LayerClassAttention(dim, num_heads, depth, mlp_ratio, drop_rate) if lca else None
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
        tokens = self.i2t(x)
        cls_token = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls_token, tokens], dim=1) + self.pos_embed)
        class_tokens = []
        for block in self.blocks:  # chained: each block refines the previous block's output
            x = block(x)
            class_tokens.append(x[:, 0])
        if self.lca is None:
            return self.head(self.norm(x[:, 0]))
        return self.head(self.norm(self.lca(torch.stack(class_tokens, dim=1))))


def _ceit(variant, num_classes, img_size, in_chans, **kwargs):
    # Only the documented options: depth, dim and heads are fixed by the variant's name.
    check_kwargs(f"ceit_{variant}", kwargs, ("drop_rate", "drop_path_rate"))
    dim, num_heads = VARIANTS[variant]  # CeiT-T/S/B share DeiT's widths and heads (paper Table 2)
    return CeiT(num_classes=num_classes, img_size=img_size, in_chans=in_chans, dim=dim, num_heads=num_heads,
                **kwargs)


def ceit_tiny(*, num_classes, img_size, in_chans, **kwargs):
    """CeiT-T: dim 192, 12 layers, 3 heads; kwargs: drop_rate, drop_path_rate."""
    return _ceit("tiny", num_classes, img_size, in_chans, **kwargs)


def ceit_small(*, num_classes, img_size, in_chans, **kwargs):
    """CeiT-S: dim 384, 12 layers, 6 heads; kwargs: drop_rate, drop_path_rate."""
    return _ceit("small", num_classes, img_size, in_chans, **kwargs)


def ceit_base(*, num_classes, img_size, in_chans, **kwargs):
    """CeiT-B: dim 768, 12 layers, 12 heads; kwargs: drop_rate, drop_path_rate."""
    return _ceit("base", num_classes, img_size, in_chans, **kwargs)


def authors_ceit(*, num_classes, img_size, in_chans, **kwargs):
    """The competitive-distillation authors' `ceit` (their CeiT(img_size, 4, num_classes), models/CeiT.py of
    XiaoleiDiao/Competitive-Distillation, commit 298039f): CeiT-T (dim 192, 12 layers, 3 heads, 4x4 token
    patches) with a 32-channel I2T stem, no layer-wise class-token attention, and their encoder layer
    (CeiTBlock's authors_layer: the class token skips LeFF; LeFF ends in BN + GELU); kwargs as ceit_tiny.

    Left out, as they cannot change the logits: the stem conv's bias (BatchNorm cancels it) and the
    last layer's LeFF stage (its patch tokens are read by nothing; their feature output fed only a
    commented-out loss). Kept from this module: the geometry from img_size (stem padding 3 and a padded
    max-pool; theirs pads 4 and 0, the same 56x56 map at 224 px), LayerNorm eps 1e-6 (theirs 1e-5) and
    DeiT's initialisation (theirs drew the class token and positions from N(0, 1))."""
    check_kwargs("ceit", kwargs, ("drop_rate", "drop_path_rate"))
    dim, num_heads = VARIANTS["tiny"]
    return CeiT(num_classes=num_classes, img_size=img_size, in_chans=in_chans, dim=dim, num_heads=num_heads,
                stem_channels=32, lca=False, authors_layers=True, **kwargs)
