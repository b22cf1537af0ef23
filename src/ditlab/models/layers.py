"""Building blocks of DiT and its variants: embedders, norms, attention (+RoPE), MLP, positions.

With the default options every module has the parameter names and shapes of the official DiT
(which builds on timm's PatchEmbed/Attention/Mlp), so official checkpoints load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.errors import DitlabError


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------- conditioning


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar (timestep, or step size) followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
        """GLIDE/ADM features [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half); t may be fractional."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelDropout(nn.Module):
    """Label dropout for classifier-free guidance, shared by every class encoding.

    Label index `num_classes` is the null ("no label") input. While training, a label becomes
    the null with probability `dropout_prob`; `force_drop_ids` (1 = drop) replaces that draw.
    `has_null`: the null input was trained, so guidance (cond vs. null) means something.
    """

    def __init__(self, num_classes: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def has_null(self) -> bool:
        return self.dropout_prob > 0

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def drop(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        """The labels after dropout: random while training, forced where force_drop_ids is given."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            return self.token_drop(labels, force_drop_ids)
        return labels

    def init_weights(self) -> None:
        """Each encoder's own init, run by DiT.initialize_weights after its xavier pass over every Linear."""
        raise NotImplementedError

    def one_hot(self, labels: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, num_classes] one-hot vectors; the null label (index num_classes) is the all-zero vector."""
        return F.one_hot(labels, self.num_classes + 1)[:, : self.num_classes].to(dtype)


class LabelEmbedder(LabelDropout):
    """Official class encoding: a learned table; row `num_classes` is the null label for CFG.

    During training a label is replaced by the null label with probability `dropout_prob`.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__(num_classes, dropout_prob)
        # The official table has a null row only when label dropout is on; an unconditional
        # model (num_classes=0) still needs one row, which then acts as a learned bias.
        use_null = dropout_prob > 0 or num_classes == 0
        self.embedding_table = nn.Embedding(num_classes + use_null, hidden_size)

    @property
    def has_null(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def init_weights(self) -> None:
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if self.num_classes == 0:  # unconditional: whatever labels come in (e.g. -1), use the null row
            labels = torch.zeros_like(labels)
        else:
            labels = self.drop(labels, train, force_drop_ids)
        return self.embedding_table(labels)


class OneHotLabelEmbedder(LabelDropout):
    """class_encoding "onehot": a one-hot vector through a bias-free Linear; the null label is the zero vector.

    Equal to an embedding lookup in `linear.weight.T` with a fixed all-zero null row: the null
    (unconditional) embedding is exactly 0 instead of a learned vector. Kept as the control
    ("one-hot is a lookup table"), and so that runs saved with this name load unchanged.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__(num_classes, dropout_prob)
        self.linear = nn.Linear(num_classes, hidden_size, bias=False) if num_classes > 0 else None
        self.hidden_size = hidden_size

    def init_weights(self) -> None:
        if self.linear is not None:
            nn.init.normal_(self.linear.weight, std=0.02)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if self.linear is None:  # unconditional: the null class everywhere, labels ignored
            return torch.zeros(labels.shape[0], self.hidden_size, device=labels.device)
        labels = self.drop(labels, train, force_drop_ids)
        return self.linear(self.one_hot(labels, self.linear.weight.dtype))


class OneHotMlpLabelEmbedder(LabelDropout):
    """class_encoding "onehot_mlp": one-hot vector -> Linear -> SiLU -> Linear, as the timestep MLP.

    The null label is the all-zero one-hot vector, so its embedding mlp(0) = W2 SiLU(b1) + b2 is
    learned through the biases alone (0 at init, while every class starts away from 0).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__(num_classes, dropout_prob)
        self.mlp = nn.Sequential(
            nn.Linear(num_classes, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def init_weights(self) -> None:
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        labels = self.drop(labels, train, force_drop_ids)
        return self.mlp(self.one_hot(labels, self.mlp[0].weight.dtype))


class OneHotTokenLabelEmbedder(OneHotMlpLabelEmbedder):
    """class_encoding "onehot_tokens": "onehot_mlp" for c, and the one-hot vector added to every token.

    `token_bias` projects the one-hot vector (bias-free, so the null label adds nothing) to the
    token width; the model adds it to every patch embedding, so the label reaches attention
    directly, not only through the adaLN modulation. Drop labels once (`drop`) and pass the
    result to both paths so they see the same label.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__(num_classes, hidden_size, dropout_prob)
        self.to_tokens = nn.Linear(num_classes, hidden_size, bias=False)

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.to_tokens.weight, std=0.02)

    def token_bias(self, labels: Tensor) -> Tensor:
        """[B, hidden] per-sample vector to add to every token; labels already dropped."""
        return self.to_tokens(self.one_hot(labels, self.to_tokens.weight.dtype))


class ScalarLabelEmbedder(LabelDropout):
    """class_encoding "scalar": the label as a number, through sinusoidal features and an MLP (as timesteps).

    Nearby labels get nearby features, so the encoding assumes an order the classes may not
    have. The null label gets a dedicated learned vector `null_embedding` (present only with
    label dropout, like the official null row): as a number, index num_classes would just be
    one more class next to the last one.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, frequency_embedding_size: int = 256):
        super().__init__(num_classes, dropout_prob)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        if dropout_prob > 0:
            self.null_embedding = nn.Parameter(torch.zeros(hidden_size))

    def init_weights(self) -> None:
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        if self.has_null:
            nn.init.normal_(self.null_embedding, std=0.02)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        labels = self.drop(labels, train, force_drop_ids)
        emb = self.mlp(TimestepEmbedder.timestep_embedding(labels, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))
        is_null = labels == self.num_classes
        if self.has_null:
            return torch.where(is_null[:, None], self.null_embedding.to(emb.dtype), emb)
        # No null vector: refuse, rather than read the null index as one more class (checked
        # only in this configuration, as it syncs; meta tensors have no values to check).
        if labels.device.type != "meta" and bool(is_null.any()):
            raise DitlabError("null label given to a scalar class encoding built with class_dropout_prob=0")
        return emb


# --------------------------------------------------------------------------- norms


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025): gamma * tanh(alpha * x) + beta, a normalisation-free LayerNorm stand-in."""

    def __init__(self, dim: int, elementwise_affine: bool = True, alpha_init: float = 0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.alpha * x)
        return x if self.weight is None else x * self.weight + self.bias


NORMS = ("layernorm", "rmsnorm", "dyt")


def make_norm(kind: str, dim: int, affine: bool) -> nn.Module:
    """adaLN blocks use affine=False (the modulation supplies scale and shift), as in the official DiT."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=affine)
    if kind == "dyt":
        return DyT(dim, elementwise_affine=affine)
    raise ValueError(f"unknown norm '{kind}'")


# --------------------------------------------------------------------------- positions


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """[sin(p w_i), cos(p w_i)], w_i = 10000^(-i/(dim/2)); float64 like the MAE/DiT numpy code."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """Official 2-D sin-cos table [grid_size**2, dim]: first half encodes the column, second the row."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], dim=1).float()


def sincos_3d(dim: int, frames: int, grid_size: int) -> Tensor:
    """3-D sin-cos table [frames * grid_size**2, dim], frame-major, as MAE-ST / Latte split it:
    the first dim/4 encode the frame index (1-D), the other 3*dim/4 the (row, col) position as
    `sincos_2d` does. Needs dim divisible by 16 (every sin/cos half even)."""
    temporal = sincos_1d(dim // 4, torch.arange(frames)).float()  # [T, dim/4]
    spatial = sincos_2d(dim // 4 * 3, grid_size)  # [h*w, 3*dim/4]
    n = spatial.shape[0]
    table = torch.cat([temporal[:, None].expand(frames, n, -1), spatial[None].expand(frames, n, -1)], dim=-1)
    return table.reshape(frames * n, dim)


def grid_positions(shape: tuple[int, ...]) -> Tensor:
    """Integer coordinates [prod(shape), len(shape)] of a row-major token grid."""
    axes = [torch.arange(n) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


class RoPE(nn.Module):
    """Axial rotary position embedding (Su et al.; 2-D as in FiT/Lumina) for queries and keys.

    The head dimension is split into one chunk per grid axis; inside a chunk, channel pairs
    (2i, 2i+1) are rotated by angle pos_axis * base^(-2i/chunk). q.k then depends on positions
    only through their differences. Tokens without a grid position (conditioning tokens) get
    the identity rotation.
    """

    def __init__(self, head_dim: int, grid: tuple[int, ...], base: float = 10000.0, extra_tokens: int = 0):
        super().__init__()
        n_axes = len(grid)
        if head_dim % (2 * n_axes):
            raise ValueError(f"head dim {head_dim} is not divisible by {2 * n_axes}")
        chunk = head_dim // n_axes
        freqs = base ** (-torch.arange(0, chunk, 2, dtype=torch.float64) / chunk)  # [chunk/2]
        pos = grid_positions(grid).to(torch.float64)  # [N, n_axes]
        angles = torch.cat([pos[:, a, None] * freqs[None] for a in range(n_axes)], dim=1)  # [N, head_dim/2]
        angles = torch.cat([angles, angles.new_zeros(extra_tokens, angles.shape[1])])
        # Buffers, not parameters, and not saved: the state dict stays free of RoPE entries.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, heads, N, head_dim]."""
        x1, x2 = x[..., 0::2], x[..., 1::2]
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


# --------------------------------------------------------------------------- tokens


TOKEN_LAYOUTS = ("2d", "3d", "channels_as_tokens")


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (timm's PatchEmbed for the 2-D layout: key `proj`).

    layout "3d": video-DiT style. The image [B,C,H,W] is a clip of T=1 frame, [B,C,T,H,W]; a
    Conv3d cuts (1,p,p) patches over all C channels, giving T*(H/p)*(W/p) tokens (as many as 2-D
    for T=1), ordered frame, row, col. Works for any C.
    layout "channels_as_tokens": the image is viewed as a 1-channel volume [B,1,C,H,W] and cut
    into (1,p,p) patches, so every input channel becomes its own frame of tokens (C*(H/p)*(W/p)).
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, embed_dim: int, layout: str = "2d"):
        super().__init__()
        self.layout = layout
        self.patch_size = (patch_size, patch_size)
        side = input_size // patch_size
        kernel = (1, patch_size, patch_size)
        if layout == "2d":
            self.grid = (side, side)
            self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        elif layout == "3d":
            self.grid = (1, side, side)  # a still image is a one-frame clip
            self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=True)
        else:
            self.grid = (in_channels, side, side)
            self.proj = nn.Conv3d(1, embed_dim, kernel_size=kernel, stride=kernel, bias=True)
        self.num_patches = math.prod(self.grid)

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "3d":
            x = x.unsqueeze(2)  # [B, C, T=1, H, W]
        elif self.layout == "channels_as_tokens":
            x = x.unsqueeze(1)  # [B, 1, C, H, W]
        # [B, N, D], made contiguous once: the transposed view (as in timm) would otherwise carry its
        # layout through every residual add, and each LayerNorm would copy it (values are unchanged).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- attention / MLP


class Attention(nn.Module):
    """Multi-head self-attention via F.scaled_dot_product_attention (timm layout: qkv, proj)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        if qk_norm:  # RMSNorm over each head's q and k (as in SD3 / Lumina): bounds attention logits
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: RoPE | None = None) -> Tensor:
        B, N, C = x.shape
        # q, k, v: [B, heads, N, head_dim] views of the qkv output (timm's permute + unbind gives the same
        # views; split's backward writes their gradients back with one cat instead of a stack and a copy).
        q, k, v = (t.squeeze(2).transpose(1, 2)
                   for t in self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).split(1, dim=2))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Tokens (queries) attend to the conditioning tokens (keys/values)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(dim, dim * 2, bias=True)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as the official DiT) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
