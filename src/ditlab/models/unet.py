"""A DDPM/ADM-style U-Net baseline (Ho et al. 2020; Dhariwal & Nichol 2021, "ADM").

Residual blocks of GroupNorm + SiLU + 3x3 conv; the conditioning vector (timestep + class
(+ step size)) enters every residual block through ADM's scale-shift norm,
GroupNorm(h) * (1 + scale) + shift. Self-attention at the resolutions listed in
`unet_attn_resolutions`, stride-2 conv downsampling, nearest + conv upsampling, skip
connections from every down-path block to the up path, zero-initialised output conv.

Same call convention as the DiT: `model(x, t, y, dt=None)` with `in_channels`,
`out_channels`, `learn_sigma`, `num_classes`, `input_size`, so every objective and sampler
uses it unchanged. On 28x28 MNIST with channel_mult [1, 2, 2] the resolutions are 28, 14, 7.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ditlab.config import ModelConfig
from ditlab.errors import DitlabError
from ditlab.models.dit import forward_with_cfg_doubled
from ditlab.models.layers import LabelEmbedder, OneHotLabelEmbedder, TimestepEmbedder


def group_norm(channels: int) -> nn.GroupNorm:
    # ADM uses 32 groups; take the largest divisor of the width up to 32 so small test widths work.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero the weights/bias so the block starts as the identity (residual) or outputs 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """h = conv(SiLU(GN(x))); h = GN(h) * (1 + scale(emb)) + shift(emb); out = skip(x) + conv(drop(SiLU(h)))."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.out_norm = group_norm(out_ch)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised projection."""

    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        if channels % self.num_heads:
            raise DitlabError(f"U-Net attention: {channels} channels do not split into {self.num_heads} heads")
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """A sequence of blocks that all take (x, emb): one step of the down or up path."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self:
            x = block(x, emb)
        return x


class UNet(nn.Module):
    def __init__(
        self,
        input_size: int = 28,
        in_channels: int = 1,
        model_channels: int = 64,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] | list[int] = (7,),
        dropout: float = 0.0,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        step_size_cond: bool = False,
        class_encoding: str = "embedding",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        _check_args(input_size, in_channels, model_channels, channel_mult, num_res_blocks, attn_resolutions, dropout, class_encoding)
        self.input_size, self.in_channels = input_size, in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.step_size_cond = step_size_cond
        self.grad_checkpointing = grad_checkpointing

        # Conditioning vector: sinusoidal(t) -> MLP, plus a class embedding, plus sinusoidal(dt) -> MLP.
        emb_dim = 4 * model_channels
        self.t_embedder = TimestepEmbedder(emb_dim, frequency_embedding_size=model_channels)
        self.dt_embedder = TimestepEmbedder(emb_dim, frequency_embedding_size=model_channels) if step_size_cond else None
        embedder = OneHotLabelEmbedder if class_encoding == "onehot" else LabelEmbedder
        self.y_embedder = embedder(num_classes, emb_dim, class_dropout_prob) if num_classes > 0 else None

        # Down path: every block's output is kept as a skip connection for the up path.
        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [model_channels]
        ch, res = model_channels, input_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                stage = Stage([ResBlock(ch, mult * model_channels, emb_dim, dropout)])
                ch = mult * model_channels
                if res in attn_resolutions:
                    stage.append(AttentionBlock(ch))
                self.down.append(stage)
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Stage([Downsample(ch)]))
                skip_channels.append(ch)
                res //= 2

        self.middle = Stage([ResBlock(ch, ch, emb_dim, dropout), AttentionBlock(ch), ResBlock(ch, ch, emb_dim, dropout)])

        # Up path: num_res_blocks + 1 blocks per level, each eating one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                stage = Stage([ResBlock(ch + skip_channels.pop(), mult * model_channels, emb_dim, dropout)])
                ch = mult * model_channels
                if res in attn_resolutions:
                    stage.append(AttentionBlock(ch))
                if level > 0 and i == num_res_blocks:
                    stage.append(Upsample(ch))
                    res *= 2
                self.up.append(stage)

        # Zero-initialised output conv (ADM): the untrained model predicts exactly 0.
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, learn_sigma: bool, step_size_cond: bool) -> "UNet":
        """Build from `cfg.model` (the unet_* fields); DiT-only options must keep their defaults."""
        _reject_dit_options(model_cfg)
        return cls(
            input_size=model_cfg.input_size,
            in_channels=model_cfg.in_channels,
            model_channels=model_cfg.unet_channels,
            channel_mult=list(model_cfg.unet_channel_mult),
            num_res_blocks=model_cfg.unet_num_res_blocks,
            attn_resolutions=list(model_cfg.unet_attn_resolutions),
            dropout=model_cfg.unet_dropout,
            num_classes=model_cfg.num_classes,
            class_dropout_prob=model_cfg.class_dropout_prob,
            learn_sigma=learn_sigma,
            step_size_cond=step_size_cond,
            class_encoding=model_cfg.class_encoding,
            grad_checkpointing=model_cfg.grad_checkpointing,
        )

    def _run(self, stage: Stage, h: Tensor, emb: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(stage, h, emb, use_reentrant=False)
        return stage(h, emb)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, dt: Tensor | None = None,
                force_drop_ids: Tensor | None = None) -> Tensor:
        """x [B, C, H, W], t [B] (timestep or t*1000), y [B] labels (num_classes = null), dt [B] step size;
        force_drop_ids as in `DiT.forward`."""
        emb = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise DitlabError("this U-Net is class-conditional: pass labels y (index num_classes = unconditional)")
            emb = emb + self.y_embedder(y, self.training, force_drop_ids)
        if self.dt_embedder is not None:
            if dt is None:
                raise DitlabError("this U-Net conditions on the step size: pass dt")
            emb = emb + self.dt_embedder(dt)
        elif dt is not None:
            raise DitlabError("dt given to a U-Net built without step-size conditioning (model.step_size_cond)")

        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float, **kw) -> Tensor:
        """The official DiT convention: x = [z; z], y = [labels; null] (see DiT.forward_with_cfg)."""
        return forward_with_cfg_doubled(self, x, t, y, cfg_scale, **kw)


def _check_args(input_size, in_channels, model_channels, channel_mult, num_res_blocks, attn_resolutions, dropout, class_encoding) -> None:
    if input_size < 1 or in_channels < 1 or model_channels < 1 or num_res_blocks < 1:
        raise DitlabError(
            f"U-Net sizes must be positive (input_size={input_size}, in_channels={in_channels}, "
            f"unet_channels={model_channels}, unet_num_res_blocks={num_res_blocks})"
        )
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise DitlabError(f"model.unet_channel_mult must be a non-empty list of positive ints, got {list(channel_mult)}")
    factor = 2 ** (len(channel_mult) - 1)
    if input_size % factor:
        raise DitlabError(
            f"U-Net input size {input_size} is not divisible by {factor} "
            f"(2^(levels-1) for unet_channel_mult {list(channel_mult)}); use fewer levels or another size"
        )
    resolutions = [input_size // 2**i for i in range(len(channel_mult))]
    bad = [r for r in attn_resolutions if r not in resolutions]
    if bad:
        raise DitlabError(f"model.unet_attn_resolutions {bad} match none of the U-Net resolutions {resolutions}")
    if not 0.0 <= dropout < 1.0:
        raise DitlabError(f"model.unet_dropout must be in [0, 1), got {dropout}")
    if class_encoding not in ("embedding", "onehot"):
        raise DitlabError(f"model.class_encoding '{class_encoding}' is not supported by the U-Net (embedding or onehot)")


# DiT-only options and their defaults: a U-Net config that changes one is a mistake worth naming.
_DIT_ONLY = {
    "hidden_size": None, "depth": None, "num_heads": None, "patch_size": None, "mlp_ratio": 4.0,
    "conditioning": "adaln_zero", "pos_embed": "sincos", "norm": "layernorm", "qk_norm": False,
    "token_layout": "2d", "token_dim": None,
}


def _reject_dit_options(model_cfg: ModelConfig) -> None:
    changed = [f"{k}={getattr(model_cfg, k)!r}" for k, default in _DIT_ONLY.items() if getattr(model_cfg, k, default) != default]
    if changed:
        raise DitlabError(f"model.name=unet does not use the DiT option(s) {', '.join(changed)}; remove them or pick a DiT model")
