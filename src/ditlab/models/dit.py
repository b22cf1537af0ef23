"""DiT (Peebles & Xie 2023): the official model, plus architecture ablations.

With default options `DiT` is the official facebookresearch/DiT model: same constructor
keywords, same `state_dict` keys and shapes, same initialisation (the same seed gives the same
weights), same outputs. One deliberate difference: `forward_with_cfg` guides all `in_channels`
prediction channels; the official code guides only the first 3 (they agree for in_channels=3).

Variants, all keyword-only and off by default (no extra parameters or keys when off):
  conditioning    adaln_zero | adaln (modulation not zero-initialised) | cross_attn | in_context
  class_encoding  embedding (learned table, null row) | onehot (bias-free Linear of a one-hot, null = 0:
                  a lookup table by construction, kept as the control) | onehot_mlp (one-hot ->
                  Linear-SiLU-Linear, null = the zero vector) | onehot_tokens (onehot_mlp, and the
                  one-hot projected and added to every token) | scalar (the label as a number,
                  sinusoidal + MLP like t, with a learned null vector)
  pos_embed       sincos (fixed 2-D table) | rope (axial RoPE on q/k, base `rope_base`)
  norm            layernorm | rmsnorm | dyt;  qk_norm (RMSNorm on each head's q and k)
  token_layout    2d | 3d (video-DiT: the image is a T=1 clip [B,C,T,H,W], Conv3d (1,p,p) patches,
                  3-D sin-cos positions; attention over T*H*W tokens) | channels_as_tokens
                  ((1,p,p) patches of [B,1,C,H,W]: each channel is a frame of tokens)
  token_dim       patch embedding width, projected to/from hidden_size by Linear layers
  step_size_cond  a second timestep embedder for the shortcut step size `dt` (added to c)
  grad_checkpointing  recompute each block in the backward pass (training only)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ditlab.errors import DitlabError
from ditlab.models.layers import (
    NORMS,
    TOKEN_LAYOUTS,
    Attention,
    CrossAttention,
    LabelDropout,
    LabelEmbedder,
    Mlp,
    OneHotLabelEmbedder,
    OneHotMlpLabelEmbedder,
    OneHotTokenLabelEmbedder,
    PatchEmbed,
    RoPE,
    ScalarLabelEmbedder,
    TimestepEmbedder,
    make_norm,
    modulate,
    sincos_1d,
    sincos_2d,
    sincos_3d,
)

CONDITIONINGS = ("adaln_zero", "adaln", "cross_attn", "in_context")
# class_encoding -> label embedder. Every one maps label num_classes to its null input (CFG).
LABEL_EMBEDDERS: dict[str, type[LabelDropout]] = {
    "embedding": LabelEmbedder,
    "onehot": OneHotLabelEmbedder,
    "onehot_mlp": OneHotMlpLabelEmbedder,
    "onehot_tokens": OneHotTokenLabelEmbedder,
    "scalar": ScalarLabelEmbedder,
}
CLASS_ENCODINGS = tuple(LABEL_EMBEDDERS)
POS_EMBEDS = ("sincos", "rope")


class DiTBlock(nn.Module):
    """Transformer block. adaLN(-Zero): shift/scale/gate regressed from c (official DiT block).

    cross_attn: self-attention, then cross-attention to the conditioning tokens, then the MLP.
    in_context: a plain pre-norm ViT block (the conditioning travels as extra tokens).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 conditioning: str = "adaln_zero", norm: str = "layernorm", qk_norm: bool = False):
        super().__init__()
        self.adaptive = conditioning in ("adaln_zero", "adaln")
        self.norm1 = make_norm(norm, hidden_size, affine=not self.adaptive)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        if conditioning == "cross_attn":
            self.norm_cross = make_norm(norm, hidden_size, affine=True)
            self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = make_norm(norm, hidden_size, affine=not self.adaptive)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        if self.adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor | None, rope: RoPE | None = None) -> Tensor:
        """c: [B, D] for adaLN, the conditioning tokens [B, M, D] for cross-attention, None in-context."""
        if self.adaptive:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + self.attn(self.norm1(x), rope)
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Norm (adaLN-modulated when adaptive), then a linear map to the patch outputs.

    With a decoupled token_dim, `linear` maps to token_dim and `token_out` projects back out.
    """

    def __init__(self, hidden_size: int, out_features: int, *, adaptive: bool = True,
                 norm: str = "layernorm", token_dim: int | None = None):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size, affine=not adaptive)
        self.linear = nn.Linear(hidden_size, token_dim or out_features, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))
        if token_dim:
            self.token_out = nn.Linear(token_dim, out_features, bias=True)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        x = self.norm_final(x)
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        x = self.linear(x)
        return self.token_out(x) if hasattr(self, "token_out") else x

    @property
    def output(self) -> nn.Linear:
        """The layer that produces the model output (zero-initialised)."""
        return self.token_out if hasattr(self, "token_out") else self.linear


def _check_options(input_size: int, patch_size: int, in_channels: int, hidden_size: int, num_heads: int,
                   num_classes: int, conditioning: str, class_encoding: str, pos_embed: str, norm: str,
                   token_layout: str, token_dim: int | None) -> None:
    """Reject unknown names and incompatible combinations with one line naming the conflict."""
    for what, value, choices in (("conditioning", conditioning, CONDITIONINGS),
                                 ("class_encoding", class_encoding, CLASS_ENCODINGS),
                                 ("pos_embed", pos_embed, POS_EMBEDS), ("norm", norm, NORMS),
                                 ("token_layout", token_layout, TOKEN_LAYOUTS)):
        if value not in choices:
            raise DitlabError(f"unknown {what} '{value}' (choose one of: {', '.join(choices)})")
    if min(input_size, patch_size, in_channels, hidden_size, num_heads) < 1 or num_classes < 0:
        raise DitlabError("input_size, patch_size, in_channels, hidden_size, num_heads must be >= 1, num_classes >= 0")
    if input_size % patch_size:
        raise DitlabError(f"patch_size {patch_size} does not divide input_size {input_size}")
    if hidden_size % num_heads:
        raise DitlabError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if token_layout == "channels_as_tokens" and in_channels < 2:
        raise DitlabError(f"token_layout channels_as_tokens makes channels a token axis and needs in_channels > 1 "
                          f"(got {in_channels}; token_layout 3d works for any in_channels)")
    if num_classes == 0 and class_encoding not in ("embedding", "onehot"):
        raise DitlabError(f"class_encoding {class_encoding} needs num_classes > 0 "
                          "(an unconditional model has no labels to encode: use embedding)")
    if token_dim is not None and token_dim < 1:
        raise DitlabError(f"token_dim must be >= 1 (got {token_dim})")
    n_axes = 2 if token_layout == "2d" else 3
    head_dim = hidden_size // num_heads
    if pos_embed == "rope" and head_dim % (2 * n_axes):
        raise DitlabError(f"pos_embed rope with a {token_layout} token grid needs a head dim divisible by "
                          f"{2 * n_axes}; hidden_size {hidden_size} / num_heads {num_heads} = {head_dim}")
    if pos_embed == "sincos" and hidden_size % 4:
        raise DitlabError(f"pos_embed sincos needs hidden_size divisible by 4 (got {hidden_size})")
    if pos_embed == "sincos" and token_layout == "3d" and hidden_size % 16:
        raise DitlabError(f"pos_embed sincos with token_layout 3d needs hidden_size divisible by 16 "
                          f"(dim/4 for the frame, 3*dim/8 per spatial axis; got {hidden_size})")


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (official keywords first, variants keyword-only)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        conditioning: str = "adaln_zero",
        class_encoding: str = "embedding",
        pos_embed: str = "sincos",
        rope_base: float = 10000.0,
        norm: str = "layernorm",
        qk_norm: bool = False,
        token_layout: str = "2d",
        token_dim: int | None = None,
        step_size_cond: bool = False,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        _check_options(input_size, patch_size, in_channels, hidden_size, num_heads, num_classes,
                       conditioning, class_encoding, pos_embed, norm, token_layout, token_dim)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.conditioning = conditioning
        self.class_encoding = class_encoding
        self.pos_embed_kind = pos_embed
        self.token_layout = token_layout
        self.step_size_cond = step_size_cond
        self.grad_checkpointing = grad_checkpointing
        adaptive = conditioning in ("adaln_zero", "adaln")

        # Module registration order follows the official code, so a seed gives the same init.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, token_dim or hidden_size, token_layout)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LABEL_EMBEDDERS[class_encoding](num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        if pos_embed == "sincos":  # fixed, not trained (but saved, as in the official checkpoints)
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, conditioning=conditioning, norm=norm, qk_norm=qk_norm)
            for _ in range(depth)
        ])
        # With channels as tokens each token carries one input channel, so it predicts that channel's outputs.
        per_token_channels = self.out_channels // in_channels if token_layout == "channels_as_tokens" else self.out_channels
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * per_token_channels,
                                      adaptive=adaptive, norm=norm, token_dim=token_dim)
        if token_dim:
            self.token_in = nn.Linear(token_dim, hidden_size)
        if step_size_cond:
            self.d_embedder = TimestepEmbedder(hidden_size)
        self.num_cond_tokens = 3 if step_size_cond else 2
        if pos_embed == "rope":
            extra = self.num_cond_tokens if conditioning == "in_context" else 0
            self.rope = RoPE(hidden_size // num_heads, self.x_embedder.grid, rope_base, extra_tokens=extra)
        else:
            self.rope = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed_kind == "sincos":
            self.pos_embed.data.copy_(self.sincos_table().unsqueeze(0))
        # Patch embedding initialised like a Linear layer (not a conv).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        # Label table N(0, 0.02) as official; the one-hot/scalar encoders init their Linears like t's MLP.
        self.y_embedder.init_weights()
        embedders = [self.t_embedder] + ([self.d_embedder] if self.step_size_cond else [])
        for emb in embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual block starts as the identity, the final modulation at 0.
        if self.conditioning == "adaln_zero":
            for block in self.blocks:
                nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
                nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        # The output layer starts at zero for every variant (the model initially predicts 0).
        nn.init.constant_(self.final_layer.output.weight, 0)
        nn.init.constant_(self.final_layer.output.bias, 0)

    def sincos_table(self) -> Tensor:
        """The fixed position table [num_patches, hidden].

        2d: the official 2-D sin-cos. 3d: frame | row, col sin-cos in dims D/4 | 3D/4 (MAE-ST).
        channels_as_tokens: the 2-D table plus a full-width 1-D sin-cos of the channel index.
        """
        dim = self.hidden_size
        grid = self.x_embedder.grid
        if self.token_layout == "3d":
            return sincos_3d(dim, grid[0], grid[-1])
        table = sincos_2d(dim, grid[-1])
        if self.token_layout == "channels_as_tokens":
            channel = sincos_1d(dim, torch.arange(grid[0])).float()
            table = (channel[:, None, :] + table[None]).reshape(-1, dim)
        return table

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, N, p*p*c] tokens -> [B, out_channels, H, W].

        3d with T=1 has the 2-D token order (frame, row, col); channels_as_tokens: channel, row, col."""
        p = self.patch_size
        h = w = self.input_size // p
        if self.token_layout == "channels_as_tokens":
            C = self.in_channels
            k = self.out_channels // C  # outputs per input channel (eps, and the sigma value)
            x = x.reshape(x.shape[0], C, h, w, p, p, k).permute(0, 6, 1, 2, 4, 3, 5)
            return x.reshape(x.shape[0], k * C, h * p, w * p)
        c = self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, dt: Tensor | None = None,
                force_drop_ids: Tensor | None = None) -> Tensor:
        """x [B,C,H,W] images or latents, t [B] timesteps, y [B] labels (num_classes = null), dt [B] step sizes.

        force_drop_ids [B] (1 = use the null label) replaces the random label dropout of training,
        for objectives that must drop labels once for several passes (shortcut models)."""
        x = self.x_embedder(x)  # [B, N, D]
        if hasattr(self, "token_in"):
            x = self.token_in(x)
        if self.pos_embed_kind == "sincos":
            x = x + self.pos_embed
        if self.class_encoding == "onehot_tokens":
            # Drop labels once, so the tokens and c see the same (possibly null) label.
            y = self.y_embedder.drop(y, self.training, force_drop_ids)
            x = x + self.y_embedder.token_bias(y).unsqueeze(1)  # the label added to every token
            y_emb = self.y_embedder(y, False)
        else:
            y_emb = self.y_embedder(y, self.training, force_drop_ids)
        cond = [self.t_embedder(t), y_emb]
        if self.step_size_cond:
            if dt is None:
                raise DitlabError("this model conditions on the step size: call it with dt=")
            cond.append(self.d_embedder(dt))
        elif dt is not None:
            raise DitlabError("dt= given to a model without step_size_cond")

        num_tokens = x.shape[1]
        c = sum(cond[1:], cond[0])  # [B, D]: t + y (+ d), as the official c = t + y
        context = c
        if self.conditioning == "cross_attn":
            context = torch.stack(cond, dim=1)  # [B, M, D] tokens to attend to
        elif self.conditioning == "in_context":
            x = torch.cat([x, torch.stack(cond, dim=1)], dim=1)  # conditioning as extra tokens
            context = None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, context, self.rope, use_reentrant=False)
            else:
                x = block(x, context, self.rope)
        x = x[:, :num_tokens]  # in-context: drop the conditioning tokens before the output layer
        x = self.final_layer(x, c)
        return self.unpatchify(x)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, **kwargs) -> Tensor:
        """Official calling convention; see `forward_with_cfg_doubled`."""
        return forward_with_cfg_doubled(self, x, t, y, cfg_scale, **kwargs)


def forward_with_cfg_doubled(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, **kwargs) -> Tensor:
    """The official DiT `forward_with_cfg`, for any model with `in_channels` (DiT and U-Net).

    The batch is already doubled, [cond half; uncond half] (y holds the null labels in the second
    half, t and tensor kwargs are doubled too); only the first half of x is used and both halves
    of the output carry the guided prediction, so one forward pass of 2B gives B guided samples.

    Difference from the official code: guidance is applied to all `in_channels` prediction
    channels (official: the first 3 only, so 4-channel latents leave channel 4 unguided and
    1-channel images guide the sigma channel too). The learned-sigma half passes through.
    """
    half = x[: len(x) // 2]
    out = model.forward(torch.cat([half, half], dim=0), t, y, **kwargs)
    eps, rest = out[:, : model.in_channels], out[:, model.in_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# --------------------------------------------------------------------------- named configs

# name -> (depth, hidden_size, num_heads), as in the paper's Table 1
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}


def _named_dit(size: str, patch: int) -> Callable[..., DiT]:
    """The official constructor `DiT_{size}_{patch}(**kwargs)` for one entry of DIT_SIZES."""
    depth, hidden_size, num_heads = DIT_SIZES[size]

    def make(**kwargs) -> DiT:
        return DiT(depth=depth, hidden_size=hidden_size, patch_size=patch, num_heads=num_heads, **kwargs)

    make.__name__ = make.__qualname__ = f"DiT_{size}_{patch}"
    make.__doc__ = f"DiT-{size}/{patch}: depth {depth}, hidden size {hidden_size}, {num_heads} heads, patch {patch}."
    return make


# Same keys, order and constructors as the official models.py: XL, L, B, S x patch 2, 4, 8.
DiT_models = {f"DiT-{size}/{patch}": _named_dit(size, patch) for size in DIT_SIZES for patch in (2, 4, 8)}
(DiT_XL_2, DiT_XL_4, DiT_XL_8, DiT_L_2, DiT_L_4, DiT_L_8,
 DiT_B_2, DiT_B_4, DiT_B_8, DiT_S_2, DiT_S_4, DiT_S_8) = DiT_models.values()


def parse_model_name(name: str) -> tuple[int, int, int, int]:
    """'DiT-B/4' -> (depth, hidden_size, num_heads, patch_size)."""
    if name not in DiT_models:
        raise DitlabError(f"unknown model '{name}' (choose one of: {', '.join(DiT_models)})")
    size, patch = name[len("DiT-"):].split("/")
    return (*DIT_SIZES[size], int(patch))


def dit_from_config(m, learn_sigma: bool, step_size_cond: bool) -> DiT:
    """A DiT from a `ModelConfig`: the named size, with any non-None overrides applied."""
    depth, hidden, heads, patch = parse_model_name(m.name)
    return DiT(
        input_size=m.input_size,
        patch_size=m.patch_size or patch,
        in_channels=m.in_channels,
        hidden_size=m.hidden_size or hidden,
        depth=m.depth if m.depth is not None else depth,
        num_heads=m.num_heads or heads,
        mlp_ratio=m.mlp_ratio,
        class_dropout_prob=m.class_dropout_prob,
        num_classes=m.num_classes,
        learn_sigma=learn_sigma,
        conditioning=m.conditioning,
        class_encoding=m.class_encoding,
        pos_embed=m.pos_embed,
        rope_base=m.rope_base,
        norm=m.norm,
        qk_norm=m.qk_norm,
        token_layout=m.token_layout,
        token_dim=m.token_dim,
        step_size_cond=step_size_cond,
        grad_checkpointing=m.grad_checkpointing,
    )
