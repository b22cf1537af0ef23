"""The DiT's building blocks that the official fixtures never call, each against a hand-written
reference: axial RoPE's angles and rotation, attention with qk-norm, cross-attention, DyT, the
class encodings' inits, biases and edge cases, and the norms, timestep features, patch embedding
and label table at their edges."""

from __future__ import annotations

import math

import pytest
import torch

from ditlab.models.layers import (Attention, CrossAttention, DyT, LabelDropout, LabelEmbedder, OneHotLabelEmbedder,
                                  OneHotMlpLabelEmbedder, OneHotTokenLabelEmbedder, PatchEmbed, RoPE,
                                  ScalarLabelEmbedder, TimestepEmbedder, make_norm)

F32_ULP = torch.finfo(torch.float32).eps  # at 1: cos and sin lie in [-1, 1]


def _rope_angles(head_dim: int, rows: int, cols: int, base: float, extra: int) -> torch.Tensor:
    """[N, head_dim/2] in float64: the first half of the pairs rotate with the row, the second with the column."""
    chunk = head_dim // 2
    freqs = [base ** (-2 * i / chunk) for i in range(chunk // 2)]
    angles = [[r * f for f in freqs] + [c * f for f in freqs] for r in range(rows) for c in range(cols)]
    return torch.tensor(angles + [[0.0] * chunk] * extra, dtype=torch.float64)


def test_rope_rotates_each_channel_pair_by_its_axis_position_times_its_frequency():
    rope = RoPE(head_dim=8, grid=(3, 4), base=100.0, extra_tokens=1)
    angles = _rope_angles(8, 3, 4, 100.0, 1)
    # the buffers are the float64 angles' cos and sin, rounded once to float32
    torch.testing.assert_close(rope.cos, angles.cos().float(), rtol=0, atol=F32_ULP)
    torch.testing.assert_close(rope.sin, angles.sin().float(), rtol=0, atol=F32_ULP)
    x = torch.randn(2, 2, 13, 8)
    got = rope(x)
    want = torch.empty_like(x)
    c, s = rope.cos, rope.sin
    want[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s  # pair (2i, 2i+1) rotated in its plane
    want[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, :, -1], x[:, :, -1])  # the conditioning token: identity
    assert rope(x.to(torch.bfloat16)).dtype == torch.bfloat16  # rotated in the input's dtype
    assert dict(rope.state_dict()) == {}  # buffers, not saved
    default = RoPE(head_dim=8, grid=(2, 3))  # base 10000, as in RoFormer and the LLMs
    torch.testing.assert_close(default.sin, _rope_angles(8, 2, 3, 10000.0, 0).sin().float(), rtol=0, atol=F32_ULP)
    with pytest.raises(ValueError, match="not divisible by 4"):
        RoPE(head_dim=6, grid=(3, 4))


def _rms(t: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight


def _softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)  # norm weights and biases away from their 1 and 0
    return module


def test_self_attention_with_qk_norm_normalises_each_heads_q_and_k():
    torch.manual_seed(0)
    attn = _randomize(Attention(dim=8, num_heads=2, qk_norm=True)).double()
    assert (attn.q_norm.eps, attn.k_norm.eps) == (1e-6, 1e-6)
    assert not any(hasattr(cls(8, 2), "q_norm") for cls in (Attention, CrossAttention))  # off by default
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[..., i * 8:(i + 1) * 8].reshape(2, 5, 2, 4).transpose(1, 2) for i in range(3))
    a = _softmax_attention(_rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight), v)
    want = a.transpose(1, 2).reshape(2, 5, 8) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cross_attention_tokens_attend_to_the_conditioning_tokens(qk_norm):
    torch.manual_seed(1)
    attn = _randomize(CrossAttention(dim=8, num_heads=2, qk_norm=qk_norm)).double()
    assert attn.q.bias is not None and attn.kv.bias is not None and attn.kv.weight.shape == (16, 8)
    x, context = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    heads = lambda t: t.reshape(2, -1, 2, 4).transpose(1, 2)  # noqa: E731
    q = heads(x @ attn.q.weight.T + attn.q.bias)
    kv = context @ attn.kv.weight.T + attn.kv.bias
    k, v = heads(kv[..., :8]), heads(kv[..., 8:])  # the first half of kv's output is k
    if qk_norm:
        assert (attn.q_norm.eps, attn.k_norm.eps) == (1e-6, 1e-6)
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    want = _softmax_attention(q, k, v).transpose(1, 2).reshape(2, 5, 8) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x, context), want)


def test_dyt_is_gamma_tanh_alpha_x_plus_beta():
    d = DyT(4)
    assert torch.equal(d.alpha, torch.tensor([0.5])) and torch.equal(d.weight, torch.ones(4)) and torch.equal(d.bias, torch.zeros(4))
    with torch.no_grad():
        d.alpha.fill_(1.3)
        d.weight.copy_(torch.tensor([0.5, -2.0, 1.5, 3.0]))
        d.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 0.4]))
    x = torch.randn(3, 4)
    torch.testing.assert_close(d(x), torch.tanh(1.3 * x) * d.weight + d.bias)
    plain = DyT(4, elementwise_affine=False, alpha_init=2.0)
    assert plain.weight is None and plain.bias is None and [n for n, _ in plain.named_parameters()] == ["alpha"]
    torch.testing.assert_close(plain(x), torch.tanh(2.0 * x))


ENCODERS = [OneHotLabelEmbedder, OneHotMlpLabelEmbedder, OneHotTokenLabelEmbedder, ScalarLabelEmbedder]


@pytest.mark.parametrize("encoder", ENCODERS, ids=lambda c: c.__name__)
def test_class_encoders_init_their_weights_as_the_official_table(encoder):
    """N(0, 0.02) weights (the official label table's init); the MLPs keep their biases."""
    torch.manual_seed(2)
    emb = encoder(10, 512, 0.1)
    emb.init_weights()
    weights = {n: p for n, p in emb.named_parameters() if n.endswith("weight") or n == "null_embedding"}
    assert weights
    for name, w in weights.items():
        # the sample std of n normal draws has a relative standard error of 1 / sqrt(2n): allow 5 of them
        assert abs(w.std().item() / 0.02 - 1) < 5 / math.sqrt(2 * w.numel()), name
    if hasattr(emb, "mlp"):
        assert emb.mlp[0].bias is not None and emb.mlp[2].bias is not None


def test_class_encoder_edge_cases():
    # an unconditional one-hot encoder gives one zero vector per example; a single class is still a class
    none = OneHotLabelEmbedder(0, 16, 0.0)
    assert none.linear is None and torch.equal(none(torch.tensor([-1, -1, -1]), train=True), torch.zeros(3, 16))
    one = OneHotLabelEmbedder(1, 16, 0.0)
    torch.testing.assert_close(one(torch.tensor([0]), train=False), one.linear.weight.T)
    # without label dropout, training draws nothing from the global RNG
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    LabelDropout(10, 0.0).drop(torch.arange(4), train=True)
    assert torch.equal(torch.rand(4), expected)
    # the scalar encoding: the timestep embedder's 256 sinusoidal features, in the model's dtype,
    # and on the meta device (shape inference, Gflops) without reading values
    scalar = ScalarLabelEmbedder(10, 32, 0.0)
    assert scalar.mlp[0].in_features == 256 == TimestepEmbedder(32).frequency_embedding_size
    assert scalar.to(torch.bfloat16)(torch.tensor([1, 2]), train=False).dtype == torch.bfloat16
    with torch.device("meta"):
        meta = ScalarLabelEmbedder(10, 32, 0.0)
        assert meta(torch.zeros(2, dtype=torch.long), train=False).shape == (2, 32)


def test_norms_timestep_features_patch_embedding_and_the_label_table_at_their_edges():
    # the norms' eps is 1e-6 (the official DiT's LayerNorm), affine only when asked (adaLN blocks: not)
    for kind, cls in (("layernorm", torch.nn.LayerNorm), ("rmsnorm", torch.nn.RMSNorm), ("dyt", DyT)):
        with_affine, without = make_norm(kind, 8, True), make_norm(kind, 8, False)
        assert isinstance(with_affine, cls) and with_affine.weight is not None and without.weight is None
        if kind != "dyt":
            assert with_affine.eps == without.eps == 1e-6
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        make_norm("batchnorm", 8, True)
    # an odd feature count: the ADM cos/sin pairs, then one zero column
    t = torch.tensor([0.0, 3.5, 999.0])
    feats = TimestepEmbedder.timestep_embedding(t, 5)
    freqs = torch.tensor([1.0, 10000 ** -0.5])
    torch.testing.assert_close(feats, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs),
                                                 torch.zeros(3, 1)], dim=1))
    # patch embedding: timm's (p, p) and the 2-D layout by default
    patches = PatchEmbed(28, 4, 1, 8)
    assert patches.patch_size == (4, 4) and patches(torch.randn(2, 1, 28, 28)).shape == (2, 49, 8)
    # the label table: a null row only with label dropout, and one row for an unconditional model
    assert LabelEmbedder(1, 16, 0.0).embedding_table.num_embeddings == 1
    none = LabelEmbedder(0, 16, 0.0)
    assert none.embedding_table.num_embeddings == 1
    torch.testing.assert_close(none(torch.tensor([-1, -1]), train=True), none.embedding_table.weight.expand(2, 16))
