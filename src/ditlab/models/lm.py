"""A decoder-only byte-level transformer (nanoGPT-style) for next-byte prediction.

    bytes [B, T] -> embedding (+ learned positions) -> n_layers x pre-norm block -> norm -> logits [B, T, 256]
    block: x = x + attn(norm(x));  x = x + mlp(norm(x))

Options (keyword arguments of `ByteLM` / `build_lm`):
  norm       rmsnorm | layernorm | dyt (Dynamic Tanh, Zhu et al. 2025: every norm, the final one
             included, becomes gamma * tanh(alpha * x) + beta; no statistics over features)
  pos        rope (rotary q/k, Su et al.) | learned (a table added to the embeddings)
  embed_scale  multiply the byte embeddings by a learnable scalar initialised at sqrt(d_model), as
             the DyT authors' LLaMA does (see ByteLM.__init__)
  attention  vanilla (causal attention over the whole context) | infini (Infini-Attention,
             `ditlab.models.infini_attention`: local attention within segments of `segment_len`
             plus a compressive memory carried from segment to segment)

The output layer shares its weight with the byte embedding. With attention=infini, positions
(rope or learned) restart at every segment, so the model runs on any number of segments; a
vanilla model reads at most `seq_len` bytes.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.config import ModelConfig
from ditlab.errors import DitlabError
from ditlab.models.infini_attention import MEMORY_UPDATES, InfiniAttention
from ditlab.models.layers import DyT

LM_NORMS = ("rmsnorm", "layernorm", "dyt")
LM_POSITIONS = ("rope", "learned")
LM_ATTENTIONS = ("vanilla", "infini")
BPTT_MODES = ("full", "truncated")


class Rotary1d(nn.Module):
    """Rotary position embedding over one axis, for any length up to `max_len`.

    Same convention as `ditlab.models.layers.RoPE` with a 1-D grid (channel pairs (2i, 2i+1)
    rotated by pos * base^(-2i/head_dim)), but it rotates a prefix of any length, which a
    language model needs (generation, a shorter last segment); layers.RoPE is fixed-length.
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        freqs = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * freqs[None]  # [max_len, head_dim/2]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, heads, T, head_dim], rotated for positions 0..T-1."""
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over the whole context (F.scaled_dot_product_attention)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: nn.Module | None = None, memory: bool = True) -> Tensor:
        """x [B, T, C] -> [B, T, C]; `memory` is accepted for a common interface and ignored."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


def make_lm_norm(kind: str, dim: int, dyt_alpha_init: float) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=1e-6)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6)
    return DyT(dim, alpha_init=dyt_alpha_init)


class Block(nn.Module):
    def __init__(self, d_model: int, attn: nn.Module, mlp_hidden: int, norm: str, dyt_alpha_init: float, dropout: float):
        super().__init__()
        self.norm1 = make_lm_norm(norm, d_model, dyt_alpha_init)
        self.attn = attn
        self.norm2 = make_lm_norm(norm, d_model, dyt_alpha_init)
        self.mlp = MLP(d_model, mlp_hidden, dropout)

    def forward(self, x: Tensor, rope: nn.Module | None, memory: bool) -> Tensor:
        x = x + self.attn(self.norm1(x), rope, memory)
        return x + self.mlp(self.norm2(x))


def _parse_bptt(bptt: str | int) -> str | int:
    """bptt is "full", "truncated", or k >= 1 (also accepted as a string of digits, e.g. from a command line)."""
    if isinstance(bptt, str) and bptt.isdigit():
        bptt = int(bptt)
    if isinstance(bptt, bool) or not (bptt in BPTT_MODES or (isinstance(bptt, int) and bptt >= 1)):
        raise DitlabError(f"bptt must be full, truncated or a positive integer k (detach every k segments), got {bptt!r}")
    return bptt


def _check_settings(*, vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int, mlp_ratio: float,
                    norm: str, pos: str, attention: str, segment_len: int | None, memory_update: str,
                    dropout: float) -> None:
    for name, value, choices in (("norm", norm, LM_NORMS), ("pos", pos, LM_POSITIONS),
                                 ("attention", attention, LM_ATTENTIONS), ("memory_update", memory_update, MEMORY_UPDATES)):
        if value not in choices:
            raise DitlabError(f"unknown {name} '{value}' (choose one of: {', '.join(choices)})")
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("d_model", d_model),
                        ("n_layers", n_layers), ("n_heads", n_heads)):
        if not isinstance(value, int) or value < 1:
            raise DitlabError(f"{name} must be a positive integer, got {value!r}")
    if d_model % n_heads:
        raise DitlabError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    if pos == "rope" and (d_model // n_heads) % 2:
        raise DitlabError(f"pos=rope needs an even head dim, got d_model/n_heads = {d_model // n_heads}")
    if not mlp_ratio > 0:
        raise DitlabError(f"mlp_ratio must be positive, got {mlp_ratio}")
    if not 0.0 <= dropout < 1.0:
        raise DitlabError(f"dropout must be in [0, 1), got {dropout}")
    if attention == "infini":
        if not isinstance(segment_len, int) or segment_len < 1:
            raise DitlabError(f"attention=infini needs segment_len, a positive integer (got {segment_len!r})")
        if seq_len % segment_len:
            raise DitlabError(f"seq_len={seq_len} is not divisible by segment_len={segment_len}")


class ByteLM(nn.Module):
    """Decoder-only transformer over bytes; `model(x) -> logits [B, T, vocab_size]`.

    `settings` holds the constructor's keyword arguments, so `ByteLM(**model.settings)` rebuilds
    the architecture (e.g. from a checkpoint).
    """

    def __init__(self, *, vocab_size: int = 256, seq_len: int = 256, d_model: int = 256, n_layers: int = 4,
                 n_heads: int = 4, mlp_ratio: float = 4.0, norm: str = "rmsnorm", dyt_alpha_init: float = 0.5,
                 pos: str = "rope", attention: str = "vanilla", segment_len: int | None = None,
                 memory_update: str = "linear", gate_init: float = 0.0, bptt: str | int = "full",
                 dropout: float = 0.0, embed_scale: bool = False):
        super().__init__()
        _check_settings(vocab_size=vocab_size, seq_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                        mlp_ratio=mlp_ratio, norm=norm, pos=pos, attention=attention, segment_len=segment_len,
                        memory_update=memory_update, dropout=dropout)
        bptt = _parse_bptt(bptt)
        self.settings = dict(vocab_size=vocab_size, seq_len=seq_len, d_model=d_model, n_layers=n_layers,
                             n_heads=n_heads, mlp_ratio=mlp_ratio, norm=norm, dyt_alpha_init=dyt_alpha_init, pos=pos,
                             attention=attention, segment_len=segment_len, memory_update=memory_update,
                             gate_init=gate_init, bptt=bptt, dropout=dropout, embed_scale=embed_scale)
        self.attention, self.seq_len, self.segment_len = attention, seq_len, segment_len
        # Positions count from the start of the context (vanilla) or of each segment (infini).
        n_positions = seq_len if attention == "vanilla" else segment_len

        self.wte = nn.Embedding(vocab_size, d_model)
        # DyT's recipe for language models: without a norm to rescale them, N(0, 0.02) embeddings
        # reach the first DyT nearly at 0, so they are multiplied by a learnable scalar that the
        # DyT authors' LLaMA code starts at sqrt(d_model) (at d_model = 4096: embeddings of std ~1.3).
        self.embed_scale = nn.Parameter(torch.tensor(math.sqrt(d_model))) if embed_scale else None
        self.wpe = nn.Embedding(n_positions, d_model) if pos == "learned" else None
        self.rope = Rotary1d(d_model // n_heads, n_positions) if pos == "rope" else None
        self.drop = nn.Dropout(dropout)

        def attn() -> nn.Module:
            if attention == "vanilla":
                return CausalSelfAttention(d_model, n_heads, dropout)
            return InfiniAttention(d_model, n_heads, segment_len, memory_update=memory_update,
                                   gate_init=gate_init, bptt=bptt, dropout=dropout)

        hidden = int(mlp_ratio * d_model)
        self.blocks = nn.ModuleList(Block(d_model, attn(), hidden, norm, dyt_alpha_init, dropout) for _ in range(n_layers))
        self.norm_f = make_lm_norm(norm, d_model, dyt_alpha_init)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2

        # GPT-2 initialisation: N(0, 0.02), and the projections that write into the residual
        # stream scaled by 1/sqrt(2 n_layers) so its variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for block in self.blocks:
            for w in (block.attn.proj.weight, block.mlp.fc2.weight):
                nn.init.normal_(w, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    @property
    def max_context(self) -> int | None:
        """Longest input the model can read in one call: seq_len (vanilla), unbounded (infini)."""
        return self.seq_len if self.attention == "vanilla" else None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied weight counts once

    def forward(self, idx: Tensor, memory: bool = True) -> Tensor:
        """idx: bytes [B, T] (int64) -> logits [B, T, vocab_size].

        memory=False (infini only) resets the compressive memory at every segment.
        """
        T = idx.shape[1]
        if self.max_context is not None and T > self.max_context:
            raise DitlabError(f"input of {T} bytes is longer than the model's context seq_len={self.seq_len}")
        h = self.wte(idx)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if self.wpe is not None:
            positions = torch.arange(T, device=idx.device)
            if self.attention == "infini":
                positions = positions % self.segment_len
            h = h + self.wpe(positions)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, self.rope, memory)
        return self.lm_head(self.norm_f(h))

    def loss(self, x: Tensor, y: Tensor, memory: bool = True) -> Tensor:
        """Mean next-byte cross-entropy (nats) of targets y [B, T] given inputs x [B, T]."""
        logits = self(x, memory=memory)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax of bf16 logits in float32
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def lm_from_config(m: ModelConfig) -> ByteLM:
    """The byte LM a run config's `model` section describes (model.name=byte-lm)."""
    sizes = {"d_model": m.hidden_size, "n_layers": m.depth, "n_heads": m.num_heads}  # None: ByteLM's default
    return build_lm(seq_len=m.lm_seq_len, mlp_ratio=m.mlp_ratio, norm=m.norm, pos=m.lm_pos, attention=m.lm_attention,
                    segment_len=m.lm_segment_len, memory_update=m.lm_memory_update, gate_init=m.lm_gate_init,
                    bptt=m.lm_bptt, dyt_alpha_init=m.lm_dyt_alpha_init, dropout=m.lm_dropout, embed_scale=m.lm_embed_scale,
                    **{k: v for k, v in sizes.items() if v is not None})


def build_lm(**kwargs) -> ByteLM:
    """A `ByteLM` from keyword settings (see `ByteLM`); unknown keywords raise DitlabError."""
    known = [name for name in inspect.signature(ByteLM).parameters]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise DitlabError(f"unknown language-model setting(s): {', '.join(unknown)} (known: {', '.join(known)})")
    return ByteLM(**kwargs)
