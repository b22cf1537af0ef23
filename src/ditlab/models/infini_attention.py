"""Infini-Attention (Munkhdalai, Faruqui & Gopal 2024, "Leave No Context Behind").

The sequence is cut into segments of `segment_len` tokens. In every layer and head, a segment's
queries read two things:

  A_dot = softmax(Q K^T / sqrt(d_k)) V            causal attention inside the segment (paper eq. 2)
  A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})    retrieval from a compressive memory (eq. 3)

with sigma = ELU + 1 and a memory M [d_k, d_v], normaliser z [d_k] per head that start at zero.
Retrieval uses the memory *before* this segment is written. After the segment the memory is
updated with the segment's keys and values:

  linear: M_s = M_{s-1} + sigma(K)^T V                                          (eq. 4)
  delta:  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))  (eq. 5)
  both:   z_s = z_{s-1} + sum_t sigma(K_t)

and the two reads are mixed by a learned scalar gate per head (eq. 6):

  A = sigmoid(beta) * A_mem + (1 - sigmoid(beta)) * A_dot,   then the output projection.

Q, K, V are the same projections for both reads. RoPE (if any) rotates only the local q/k, with
positions counted from the start of each segment; the memory is addressed by content alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.errors import DitlabError

MEMORY_UPDATES = ("linear", "delta")


def elu_plus_one(x: Tensor) -> Tensor:
    """sigma(x) = ELU(x) + 1 > 0: the positive feature map of the linear-attention memory."""
    return F.elu(x) + 1.0


def memory_retrieve(sigma_q: Tensor, M: Tensor, z: Tensor) -> Tensor:
    """sigma(Q) M / (sigma(Q) z): sigma_q [..., L, d_k], M [..., d_k, d_v], z [..., d_k] -> [..., L, d_v].

    The denominator sigma(Q) z is a sum of products of positive features, so it is 0 only where
    the memory is still empty (z = 0; then M = 0 too, as a row of M changes only when the same
    component of z grows). That read is 0/0; we define it as 0 ("nothing stored, nothing
    retrieved") and divide by 1 there, so neither the value nor its gradient is NaN.
    """
    num = sigma_q @ M
    den = (sigma_q @ z.unsqueeze(-1))  # [..., L, 1]: one normaliser per query
    empty = den == 0
    return torch.where(empty, 0.0, num / torch.where(empty, 1.0, den))


def memory_update(sigma_k: Tensor, v: Tensor, M: Tensor, z: Tensor, rule: str) -> tuple[Tensor, Tensor]:
    """Write one segment's keys/values into the memory; returns the new (M, z).

    delta: only the part of V the memory does not already return for these keys is written, so
    storing the same key/value pair twice leaves M unchanged. The correction is read from the
    memory before this segment, for all of its tokens at once (eq. 5), not token by token.
    """
    if rule == "delta":
        v = v - memory_retrieve(sigma_k, M, z)
    M = M + sigma_k.transpose(-2, -1) @ v
    z = z + sigma_k.sum(dim=-2)
    return M, z


class InfiniAttention(nn.Module):
    """Multi-head Infini-Attention; same `qkv`/`proj` layout as the vanilla causal attention.

    bptt: "full" keeps the autograd graph through the memory across all segments, "truncated"
    detaches M and z at every segment boundary, an int k detaches them every k segments (at the
    start of segments k, 2k, ...). Memory state lives only inside one forward call: every call
    starts from an empty memory, so sequences never leak into each other.
    """

    def __init__(self, d_model: int, n_heads: int, segment_len: int, *, memory_update: str = "linear",
                 gate_init: float = 0.0, bptt: str | int = "full", dropout: float = 0.0):
        super().__init__()
        if memory_update not in MEMORY_UPDATES:
            raise DitlabError(f"unknown memory_update '{memory_update}' (choose one of: {', '.join(MEMORY_UPDATES)})")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.segment_len = segment_len
        self.update_rule = memory_update
        # detach every `detach_every` segments; None = never (full BPTT)
        self.detach_every = None if bptt == "full" else 1 if bptt == "truncated" else int(bptt)
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.beta = nn.Parameter(torch.full((n_heads,), float(gate_init)))  # one gate per head
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: nn.Module | None = None, memory: bool = True) -> Tensor:
        """x [B, T, C] -> [B, T, C]. The last segment may be shorter than segment_len.

        memory=False resets the memory at every segment: retrieval is then always empty (0) and
        each segment sees only itself, weighted by (1 - sigmoid(beta)) as the model was trained.
        """
        B, T, C = x.shape
        H, L = self.n_heads, self.segment_len
        q, k, v = self.qkv(x).view(B, T, 3, H, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, d]
        gate = torch.sigmoid(self.beta).view(1, H, 1, 1)
        # The memory sums over ever more tokens; keep it (and the division) in at least float32
        # even when the rest of the layer runs in bf16 under autocast.
        mem_dtype = torch.promote_types(q.dtype, torch.float32)
        M = q.new_zeros(B, H, self.head_dim, self.head_dim, dtype=mem_dtype)
        z = q.new_zeros(B, H, self.head_dim, dtype=mem_dtype)
        outs = []
        for s, start in enumerate(range(0, T, L)):
            qs, ks, vs = (t[:, :, start:start + L] for t in (q, k, v))
            if self.detach_every is not None and s > 0 and s % self.detach_every == 0:
                M, z = M.detach(), z.detach()
            qr, kr = (rope(qs), rope(ks)) if rope is not None else (qs, ks)
            a_dot = F.scaled_dot_product_attention(qr, kr, vs, is_causal=True,
                                                   dropout_p=self.dropout if self.training else 0.0)
            with torch.autocast(x.device.type, enabled=False):
                sigma_q, sigma_k = elu_plus_one(qs.to(mem_dtype)), elu_plus_one(ks.to(mem_dtype))
                a_mem = memory_retrieve(sigma_q, M, z)  # memory as it was before this segment
                if memory and start + L < T:  # no one reads the memory after the last segment
                    M, z = memory_update(sigma_k, vs.to(mem_dtype), M, z, self.update_rule)
            outs.append(gate * a_mem.to(a_dot.dtype) + (1 - gate) * a_dot)
        y = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))
