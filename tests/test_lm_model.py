"""Byte-level language models: Infini-Attention against naive loops, DyT, BPTT, settings, training.

Comparisons against reference loops run in float64. Their tolerance, TOL64 = 1e-10, follows
from float64 rounding (eps = 2.2e-16): every compared quantity is a sum of at most a few hundred
products of O(1) numbers, so the two computations may differ by ~1e-13, far below 1e-10, while
any modelling error (a wrong mask, normaliser or update order) is O(0.01) or more.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ditlab.errors import DitlabError
from ditlab.eval.lm import generate, passkey_accuracy, passkey_sequences
from ditlab.models.infini_attention import InfiniAttention, elu_plus_one, memory_retrieve, memory_update
from ditlab.models.layers import DyT, RoPE
from ditlab.models.lm import ByteLM, CausalSelfAttention, Rotary1d, build_lm
from ditlab.objectives.next_byte import NextByteObjective

TOL64 = 1e-10
TINY = dict(seq_len=16, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(rule: str = "linear", segment_len: int = 4, d_model: int = 8, n_heads: int = 2, bptt="full", seed: int = 0):
    torch.manual_seed(seed)
    layer = InfiniAttention(d_model, n_heads, segment_len, memory_update=rule, bptt=bptt).double()
    with torch.no_grad():  # gates away from 0 and 1, different per head, so both reads matter
        layer.beta.copy_(torch.tensor([0.4, -0.9], dtype=torch.float64)[:n_heads])
    return layer


@torch.no_grad()
def _split_qkv(layer: nn.Module, x: torch.Tensor):
    """q, k, v [B, T, H, d] from the layer's own projection, in float64."""
    B, T, C = x.shape
    qkv = x.double() @ layer.qkv.weight.double().T
    return [t.reshape(B, T, layer.n_heads, layer.head_dim) for t in qkv.split(C, dim=-1)]


@torch.no_grad()
def reference_infini(layer: InfiniAttention, x: torch.Tensor, rule: str) -> torch.Tensor:
    """The paper's equations with plain loops over batch, heads, segments and tokens."""
    B, T, C = x.shape
    H, d, L = layer.n_heads, layer.head_dim, layer.segment_len
    q, k, v = _split_qkv(layer, x)

    def sigma(u):  # ELU(u) + 1, written out
        return torch.where(u > 0, u + 1, torch.exp(u))

    out = torch.zeros(B, T, H, d, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = 1.0 / (1.0 + math.exp(-layer.beta[h].item()))
            M, z = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
            for s0 in range(0, T, L):
                seg = range(s0, min(s0 + L, T))
                for t in seg:
                    scores = [(q[b, t, h] @ k[b, j, h]).item() / math.sqrt(d) for j in range(s0, t + 1)]
                    m = max(scores)
                    w = [math.exp(s - m) for s in scores]
                    a_dot = sum(wj * v[b, j, h] for wj, j in zip(w, range(s0, t + 1))) / sum(w)
                    sq = sigma(q[b, t, h])
                    den = float(sq @ z)
                    a_mem = (sq @ M) / den if den != 0 else torch.zeros(d, dtype=torch.float64)
                    out[b, t, h] = g * a_mem + (1 - g) * a_dot
                # write the segment; the delta correction reads the memory from before the segment
                targets = []
                for t in seg:
                    sk = sigma(k[b, t, h])
                    den = float(sk @ z)
                    retrieved = (sk @ M) / den if den != 0 else torch.zeros(d, dtype=torch.float64)
                    targets.append(v[b, t, h] - retrieved if rule == "delta" else v[b, t, h])
                for t, target in zip(seg, targets):
                    sk = sigma(k[b, t, h])
                    M = M + torch.outer(sk, target)
                    z = z + sk
    return out.reshape(B, T, C) @ layer.proj.weight.double().T


@torch.no_grad()
def masked_softmax_attention(x: torch.Tensor, layer: nn.Module, segment_len: int) -> torch.Tensor:
    """Causal softmax attention inside each segment, by an explicit -inf mask; float64."""
    B, T, C = x.shape
    q, k, v = (t.transpose(1, 2) for t in _split_qkv(layer, x))  # [B, H, T, d]
    outs = []
    for s0 in range(0, T, segment_len):
        qs, ks, vs = (t[:, :, s0:s0 + segment_len] for t in (q, k, v))
        n = qs.shape[2]
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(layer.head_dim)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ vs)
    y = torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, C)
    return y @ layer.proj.weight.double().T


# --------------------------------------------------------------------------- Infini-Attention


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_infini_layer_matches_per_token_reference_loop(rule):
    layer = _layer(rule)
    x = torch.randn(2, 14, 8, dtype=torch.float64)  # 3 full segments of 4 and a last one of 2
    out = layer(x)
    ref = reference_infini(layer, x, rule)
    torch.testing.assert_close(out, ref, rtol=0, atol=TOL64)
    # the memory matters: without it, segments after the first differ from the reference
    assert (layer(x, memory=False)[:, 4:] - ref[:, 4:]).abs().max() > 1e-3
    torch.testing.assert_close(layer(x, memory=False)[:, :4], ref[:, :4], rtol=0, atol=TOL64)


def test_gate_forced_local_equals_masked_softmax_per_segment():
    layer = _layer("linear")
    with torch.no_grad():
        layer.beta.fill_(-1e4)  # sigmoid(-1e4) == 0.0 exactly: the memory read is switched off
    x = torch.randn(2, 14, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), masked_softmax_attention(x, layer, 4), rtol=0, atol=TOL64)
    # the vanilla layer is the same computation over one segment spanning the whole input
    vanilla = CausalSelfAttention(8, 2).double()
    vanilla.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "beta"})
    torch.testing.assert_close(vanilla(x), masked_softmax_attention(x, vanilla, 14), rtol=0, atol=TOL64)


def test_empty_memory_contributes_nothing_and_gradients_are_finite():
    sigma_q = elu_plus_one(torch.randn(2, 2, 5, 4))
    M = torch.zeros(2, 2, 4, 4, requires_grad=True)
    z = torch.zeros(2, 2, 4, requires_grad=True)
    read = memory_retrieve(sigma_q, M, z)
    assert torch.equal(read, torch.zeros(2, 2, 5, 4))
    read.sum().backward()
    assert torch.isfinite(M.grad).all() and torch.isfinite(z.grad).all()

    torch.manual_seed(0)
    layer = InfiniAttention(8, 2, segment_len=6)  # float32, beta = 0: gate 1/2
    x = torch.randn(3, 6, 8, requires_grad=True)  # exactly one segment: memory stays empty
    out = layer(x)
    with torch.no_grad():
        layer.beta.fill_(-1e4)
        local = layer(x)
    # gate * 0 + (1 - 1/2) * A_dot, and halving is exact in floating point
    assert torch.equal(out, 0.5 * local)
    out.square().sum().backward()
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_delta_rule_does_not_store_a_pair_twice_linear_rule_does():
    torch.manual_seed(0)
    d = 6
    sigma_k = elu_plus_one(torch.randn(1, 1, 1, d, dtype=torch.float64))  # one key ...
    v = torch.randn(1, 1, 1, d, dtype=torch.float64)  # ... and its value
    M0, z0 = torch.zeros(1, 1, d, d, dtype=torch.float64), torch.zeros(1, 1, d, dtype=torch.float64)

    M1, z1 = memory_update(sigma_k, v, M0, z0, "delta")
    torch.testing.assert_close(M1[0, 0], torch.outer(sigma_k.flatten(), v.flatten()), rtol=0, atol=TOL64)
    torch.testing.assert_close(memory_retrieve(sigma_k, M1, z1), v, rtol=0, atol=TOL64)  # stored exactly
    M2, z2 = memory_update(sigma_k, v, M1, z1, "delta")
    torch.testing.assert_close(M2, M1, rtol=0, atol=TOL64)  # nothing new to store
    assert torch.equal(z2, 2 * z1)  # the normaliser still counts the key

    L1, y1 = memory_update(sigma_k, v, M0, z0, "linear")
    assert torch.equal(L1, M1)  # from an empty memory both rules write sigma(k)^T v
    L2, y2 = memory_update(sigma_k, v, L1, y1, "linear")
    assert torch.equal(L2, 2 * L1) and torch.equal(y2, 2 * y1)  # the same pair added again


def test_memory_functions_take_any_leading_dims():
    """[L, d] without batch or head dims: the same memory as the [1, 1, L, d] layout."""
    torch.manual_seed(1)
    sigma_k, v = elu_plus_one(torch.randn(3, 4, dtype=torch.float64)), torch.randn(3, 4, dtype=torch.float64)
    M0, z0 = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for rule in ("linear", "delta"):
        M, z = memory_update(sigma_k, v, *memory_update(sigma_k, v, M0, z0, rule), rule)
        M4, z4 = memory_update(sigma_k[None, None], v[None, None], *memory_update(sigma_k[None, None], v[None, None],
                                                                                  M0[None, None], z0[None, None], rule),
                               rule)
        torch.testing.assert_close(M, M4[0, 0], rtol=0, atol=TOL64)
        torch.testing.assert_close(z, z4[0, 0], rtol=0, atol=TOL64)
        torch.testing.assert_close(z, 2 * sigma_k.sum(0), rtol=0, atol=TOL64)
    with pytest.raises(DitlabError, match="unknown memory_update 'hebbian'"):
        InfiniAttention(8, 2, 4, memory_update="hebbian")
    assert InfiniAttention(8, 2, 4).update_rule == "linear"


def test_memory_runs_in_float32_under_bf16_and_autocast(monkeypatch):
    """The memory (its state, reads and writes) stays float32 when the layer runs in bf16 or under
    autocast; the last segment writes nothing (nothing reads it)."""
    import ditlab.models.infini_attention as infini

    seen = []

    def spy(fn):
        def wrapped(*args):
            out = fn(*args)
            seen.append((fn.__name__, [a.dtype for a in args if torch.is_tensor(a)],
                         [o.dtype for o in (out if isinstance(out, tuple) else (out,))]))
            return out
        return wrapped

    monkeypatch.setattr(infini, "memory_retrieve", spy(memory_retrieve))
    monkeypatch.setattr(infini, "memory_update", spy(memory_update))
    torch.manual_seed(0)
    layer = InfiniAttention(8, 2, segment_len=4)
    x = torch.randn(2, 12, 8)
    for run in (lambda: layer.to(torch.bfloat16)(x.to(torch.bfloat16)),
                lambda: torch.autocast("cpu", dtype=torch.bfloat16)(layer.float())(x)):
        seen.clear()
        out = run()
        assert out.dtype == torch.bfloat16
        assert [name for name, _, _ in seen] == ["memory_retrieve", "memory_update"] * 2 + ["memory_retrieve"]
        assert all(d == torch.float32 for _, args, outs in seen for d in args + outs), seen


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    layer = InfiniAttention(8, 2, segment_len=4, dropout=0.5)
    plain = InfiniAttention(8, 2, segment_len=4)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 8)
    layer.eval()
    assert torch.equal(layer(x), plain(x))  # no dropout in eval mode
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    layer.resid_dropout.p = 0.0  # only the attention weights' dropout left
    torch.manual_seed(1)
    b = layer(x)
    assert not torch.allclose(a, plain(x)) and not torch.allclose(b, plain(x))


# --------------------------------------------------------------------------- BPTT


def _segment_grads(model: ByteLM, x: torch.Tensor, loss_segment: int, memory: bool = True) -> list[float]:
    """|d loss(segment) / d embeddings(segment j)| for every segment j."""
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["h"] = output

    handle = model.wte.register_forward_hook(keep)
    logits = model(x, memory=memory)
    handle.remove()
    L = model.segment_len
    sl = slice(loss_segment * L, (loss_segment + 1) * L)
    F.cross_entropy(logits[:, sl].reshape(-1, 256), x[:, sl].reshape(-1)).backward()
    grad = captured["h"].grad
    return [float(grad[:, j * L:(j + 1) * L].abs().max()) for j in range(x.shape[1] // L)]


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_truncated_bptt_cuts_gradients_through_memory_exactly(pos):
    # Local attention, MLPs, norms and (segment-local) positions never mix segments, so the
    # memory is the only path from one segment to the next.
    x = torch.randint(0, 256, (2, 16))
    settings = dict(TINY, pos=pos, attention="infini", segment_len=4)
    for bptt, loss_segment, expected_nonzero in [
        ("truncated", 3, [3]),
        ("truncated", 1, [1]),  # cut at the first boundary too
        ("full", 3, [0, 1, 2, 3]),
        (2, 3, [2, 3]),  # detached at the start of segment 2 only
        (2, 1, [0, 1]),
        ("full", 1, [0, 1]),  # later segments never influence earlier ones
    ]:
        torch.manual_seed(0)
        model = build_lm(**settings, bptt=bptt)
        grads = _segment_grads(model, x, loss_segment)
        for j, g in enumerate(grads):
            if j in expected_nonzero:
                assert g > 1e-8, (bptt, loss_segment, j, grads)
            else:
                assert g == 0.0, (bptt, loss_segment, j, grads)
    # memory reset at every segment: no cross-segment gradient even with full BPTT
    torch.manual_seed(0)
    grads = _segment_grads(build_lm(**settings, bptt="full"), x, 3, memory=False)
    assert grads[:3] == [0.0, 0.0, 0.0] and grads[3] > 0


# --------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_infini_with_one_segment_and_closed_gate_equals_vanilla(pos):
    torch.manual_seed(0)
    vanilla = build_lm(**TINY, pos=pos).double()
    infini = build_lm(**TINY, pos=pos, attention="infini", segment_len=16, gate_init=-1e4).double()
    missing, unexpected = infini.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("attn.beta") for k in missing)
    x = torch.randint(0, 256, (3, 16))
    torch.testing.assert_close(infini(x), vanilla(x), rtol=0, atol=TOL64)


def _norm_reference(kind: str, x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    w = sd[prefix + "weight"]
    if kind == "rmsnorm":
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w
    if kind == "layernorm":
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt((x - mu).square().mean(-1, keepdim=True) + 1e-6) * w + sd[prefix + "bias"]
    return w * torch.tanh(sd[prefix + "alpha"] * x) + sd[prefix + "bias"]


def _rotate_reference(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Channel pair (2i, 2i+1) at position p turned by p * 10000^(-2i/d); the angle's cos and sin
    rounded to float32, as the model stores its tables."""
    d = t.shape[-1]
    angle = positions.double()[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos().float().double(), angle.sin().float().double()
    out = t.clone()
    out[..., 0::2] = t[..., 0::2] * cos - t[..., 1::2] * sin
    out[..., 1::2] = t[..., 0::2] * sin + t[..., 1::2] * cos
    return out


@torch.no_grad()
def reference_lm(model: ByteLM, idx: torch.Tensor) -> torch.Tensor:
    """The whole byte LM written out from its state dict and settings, in float64: embeddings
    (scaled, plus learned positions), pre-norm blocks with explicit causal softmax attention (or the
    Infini reference loop) and an erf-GELU MLP, the final norm, logits from the tied embedding."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    s = model.settings
    H, d = s["n_heads"], s["d_model"] // s["n_heads"]
    B, T = idx.shape
    infini = s["attention"] == "infini"
    positions = torch.arange(T) % (s["segment_len"] if infini else T)
    h = sd["wte.weight"][idx] * (sd["embed_scale"] if s["embed_scale"] else 1.0)
    if s["pos"] == "learned":
        h = h + sd["wpe.weight"][positions]
    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}."
        a = _norm_reference(s["norm"], h, sd, pre + "norm1.")
        if infini:
            attn = reference_infini(block.attn, a, s["memory_update"])
        else:
            q, k, v = (t.reshape(B, T, H, d).transpose(1, 2) for t in (a @ sd[pre + "attn.qkv.weight"].T).split(H * d, -1))
            if s["pos"] == "rope":
                q, k = _rotate_reference(q, positions), _rotate_reference(k, positions)
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1),
                                                                          float("-inf"))
            attn = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, H * d) @ sd[pre + "attn.proj.weight"].T
        h = h + attn
        m = _norm_reference(s["norm"], h, sd, pre + "norm2.") @ sd[pre + "mlp.fc1.weight"].T
        h = h + (0.5 * m * (1 + torch.erf(m / math.sqrt(2)))) @ sd[pre + "mlp.fc2.weight"].T
    return _norm_reference(s["norm"], h, sd, "norm_f.") @ sd["wte.weight"].T


@pytest.mark.parametrize("settings", [
    dict(norm="rmsnorm", pos="rope"),
    dict(norm="layernorm", pos="learned"),
    dict(norm="dyt", pos="rope", embed_scale=True, dyt_alpha_init=0.3),
    dict(norm="layernorm", pos="learned", attention="infini", segment_len=4, memory_update="delta", gate_init=0.7),
])
def test_byte_lm_matches_a_written_out_reference(settings):
    torch.manual_seed(0)
    model = build_lm(**{**TINY, "n_heads": 4 if settings.get("attention") != "infini" else 2}, **settings).double()
    with torch.no_grad():  # norms away from their identity initialisation, so a swapped or skipped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("embed_scale"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(model(x), reference_lm(model, x), rtol=0, atol=TOL64)
    # the loss is the mean cross-entropy of these logits (with the memory switch passed on)
    for memory in (True, False):
        logits = model(x[:, :-1], memory=memory)
        expected = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        torch.testing.assert_close(model.loss(x[:, :-1], x[:, 1:], memory=memory), expected, rtol=0, atol=TOL64)
    if settings.get("attention") == "infini":  # memory=False reaches the layers through the loss
        assert (model.loss(x[:, :-1], x[:, 1:], memory=False) - model.loss(x[:, :-1], x[:, 1:])).abs() > 1e-6


def test_rotary_tables_are_float64_angles_rounded_once():
    rot = Rotary1d(8, 300)
    angle = torch.arange(300, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    assert torch.equal(rot.cos, angle.cos().float()) and torch.equal(rot.sin, angle.sin().float())
    assert not set(rot.state_dict())  # rebuilt, not saved


def test_bf16_model_runs_in_bf16_and_takes_its_loss_in_float32():
    torch.manual_seed(0)
    for settings in (dict(pos="rope"), dict(pos="learned", attention="infini", segment_len=4)):
        model = build_lm(**TINY, **settings).to(torch.bfloat16)
        x = torch.randint(0, 256, (2, 16))
        logits = model(x[:, :-1])
        assert logits.dtype == torch.bfloat16
        expected = F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1))
        assert torch.equal(model.loss(x[:, :-1], x[:, 1:]), expected)
        terms = NextByteObjective().loss(model, x[:, :-1], x[:, 1:])  # the trainer's loss: the same
        assert torch.equal(terms["loss"], expected) and torch.equal(terms["bpb"], expected / math.log(2))


def test_num_params_counts_the_tied_weight_once():
    d, hidden, layers = TINY["d_model"], int(TINY["mlp_ratio"] * TINY["d_model"]), TINY["n_layers"]
    per_block = 3 * d * d + d * d + 2 * d * hidden + 2 * d  # qkv, proj, fc1, fc2 (no biases), two RMSNorm weights
    assert build_lm(**TINY).num_params() == 256 * d + layers * per_block + d
    # learned positions add a table; DyT norms a weight, bias and alpha each; Infini a gate per head
    assert build_lm(**TINY, pos="learned").num_params() == 256 * d + 16 * d + layers * per_block + d
    assert build_lm(**TINY, norm="dyt").num_params() == 256 * d + layers * (per_block + 2 * (d + 1)) + 2 * d + 1
    assert build_lm(**TINY, attention="infini", segment_len=4).num_params() == \
        256 * d + layers * (per_block + TINY["n_heads"]) + d
    # an Infini model's learned positions restart at every segment: a table of segment_len rows
    assert build_lm(**TINY, pos="learned", attention="infini", segment_len=4).wpe.weight.shape == (4, d)


def test_gpt2_initialisation_and_dropout_everywhere():
    """N(0, 0.02) weights; the two projections into the residual stream N(0, 0.02 / sqrt(2 n_layers)).
    The sample std of n draws is within 4 / sqrt(2 n) of the truth (relative), the mean within
    4 sigma / sqrt(n)."""
    torch.manual_seed(0)
    model = build_lm(seq_len=64, d_model=128, n_layers=8, n_heads=4, pos="learned", dropout=0.3)

    def check(w, std):
        n = w.numel()
        assert abs(w.std().item() / std - 1) < 4 / math.sqrt(2 * n) and abs(w.mean().item()) < 4 * std / math.sqrt(n)

    check(model.wte.weight, 0.02)
    check(model.wpe.weight, 0.02)
    for block in model.blocks:
        check(block.attn.qkv.weight, 0.02)
        check(block.mlp.fc1.weight, 0.02)
        check(block.attn.proj.weight, 0.02 / 4)  # sqrt(2 * 8) = 4
        check(block.mlp.fc2.weight, 0.02 / 4)
    for attention in ("vanilla", "infini"):
        m = build_lm(**TINY, attention=attention, segment_len=4, dropout=0.3)
        assert all(b.attn.dropout == 0.3 and b.attn.resid_dropout.p == 0.3 and b.mlp.dropout.p == 0.3 for b in m.blocks)
        assert m.drop.p == 0.3


def test_dropout_of_the_vanilla_attention_acts_in_training_only():
    torch.manual_seed(0)
    layer, plain = CausalSelfAttention(8, 2, dropout=0.5), CausalSelfAttention(8, 2)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 8)
    assert torch.equal(layer.eval()(x), plain(x))
    layer.train().resid_dropout.p = 0.0  # only the attention weights' dropout left
    assert not torch.allclose(layer(x), plain(x))


def test_lm_from_config_passes_every_setting():
    from ditlab.config import load_config
    from ditlab.models.lm import lm_from_config

    cfg = load_config(None, ["model.name=byte-lm", "objective.kind=next-byte", "data.source=text", "model.hidden_size=24",
                             "model.depth=3", "model.num_heads=3", "model.mlp_ratio=3.0", "model.norm=dyt",
                             "model.lm_seq_len=32", "model.lm_pos=learned", "model.lm_attention=infini",
                             "model.lm_segment_len=8", "model.lm_memory_update=delta", "model.lm_gate_init=-1.5",
                             "model.lm_bptt=2", "model.lm_dyt_alpha_init=0.25", "model.lm_dropout=0.1",
                             "model.lm_embed_scale=true"])
    model = lm_from_config(cfg.model)
    assert model.settings == dict(vocab_size=256, seq_len=32, d_model=24, n_layers=3, n_heads=3, mlp_ratio=3.0,
                                  norm="dyt", dyt_alpha_init=0.25, pos="learned", attention="infini", segment_len=8,
                                  memory_update="delta", gate_init=-1.5, bptt=2, dropout=0.1, embed_scale=True)


def test_memory_state_lives_inside_one_call():
    torch.manual_seed(0)
    model = build_lm(**TINY, attention="infini", segment_len=4, memory_update="delta").double()
    x = torch.randint(0, 256, (2, 16))
    out = model(x)
    assert torch.equal(model(x), out)  # no state carried between calls
    torch.testing.assert_close(model(x[:, :8]), out[:, :8], rtol=0, atol=TOL64)  # causal, fresh memory
    # memory=False equals running every segment as its own sequence
    separate = torch.cat([model(x[:, s:s + 4]) for s in range(0, 16, 4)], dim=1)
    torch.testing.assert_close(model(x, memory=False), separate, rtol=0, atol=TOL64)
    # ... and the memory changes later segments (infini models run past seq_len too)
    longer = torch.randint(0, 256, (2, 24))
    assert (model(longer)[:, 4:] - model(longer, memory=False)[:, 4:]).abs().max() > 1e-4


def test_rotary_matches_layers_rope_on_full_length():
    x = torch.randn(2, 3, 10, 8)
    torch.testing.assert_close(Rotary1d(8, 10)(x), RoPE(8, (10,))(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(Rotary1d(8, 32)(x), RoPE(8, (10,))(x), rtol=0, atol=1e-6)  # prefix of a longer table


def test_dyt_formula_alpha_init_and_no_normalisation_statistics():
    torch.manual_seed(0)
    model = build_lm(**TINY, norm="dyt", dyt_alpha_init=0.3)
    dyts = [m for m in model.modules() if isinstance(m, DyT)]
    assert len(dyts) == 2 * TINY["n_layers"] + 1  # two per block and the final norm
    assert all(m.alpha.item() == pytest.approx(0.3) for m in dyts)
    assert not any(isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)) for m in model.modules())
    # no buffers at all in the state (no running statistics); rotary tables are not saved
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters(remove_duplicate=False)}

    dyt = dyts[0]
    with torch.no_grad():
        dyt.alpha.fill_(0.7)
        dyt.weight.copy_(torch.randn(16))
        dyt.bias.copy_(torch.randn(16))
    dyt = dyt.double()
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = dyt.weight * torch.tanh(float(dyt.alpha) * x) + dyt.bias
    torch.testing.assert_close(dyt(x), expected, rtol=0, atol=TOL64)
    # element-wise: changing one feature changes no other feature (no statistics over features)
    y = x.clone()
    y[..., 3] += 10.0
    diff = (dyt(y) - dyt(x)).abs().amax(dim=(0, 1))
    assert diff[3] > 0 and torch.all(diff[torch.arange(16) != 3] == 0)


def test_embed_scale_multiplies_the_input_embeddings_only():
    """DyT's LLM recipe: a learnable scalar from sqrt(d_model) on the byte embeddings; the tied
    output layer is not scaled, and without the option the state dict is unchanged."""
    torch.manual_seed(0)
    plain = build_lm(**TINY, norm="dyt").double()
    scaled = build_lm(**TINY, norm="dyt", embed_scale=True).double()
    assert "embed_scale" not in plain.state_dict()
    assert scaled.embed_scale.item() == pytest.approx(math.sqrt(TINY["d_model"]))
    assert scaled.settings["embed_scale"] is True
    scaled.load_state_dict({**plain.state_dict(), "embed_scale": scaled.embed_scale.detach()})
    x = torch.randint(0, 256, (2, 8))
    # the scaled model equals the plain one whose input embeddings (not its tied output) are multiplied
    factor = scaled.embed_scale.item()
    reference = build_lm(**TINY, norm="dyt").double()
    reference.load_state_dict(plain.state_dict())
    reference.lm_head.weight = nn.Parameter(plain.wte.weight.detach().clone())  # untie, then scale the input side
    with torch.no_grad():
        reference.wte.weight.mul_(factor)
    torch.testing.assert_close(scaled(x), reference(x), rtol=1e-12, atol=1e-12)
    scaled.loss(x[:, :-1], x[:, 1:]).backward()
    assert scaled.embed_scale.grad is not None and scaled.embed_scale.grad.item() != 0


@pytest.mark.parametrize("settings, message", [
    (dict(norm="batchnorm"), "unknown norm"),
    (dict(attention="linear"), "unknown attention"),
    (dict(pos="sincos"), "unknown pos"),
    (dict(attention="infini", segment_len=4, memory_update="hebbian"), "unknown memory_update"),
    (dict(attention="infini", segment_len=5), "not divisible by segment_len"),
    (dict(attention="infini"), "needs segment_len"),
    (dict(d_model=18, n_heads=4), "not divisible by n_heads"),
    (dict(d_model=6, n_heads=2), "even head dim"),
    (dict(attention="infini", segment_len=4, bptt="sometimes"), "bptt"),
    (dict(attention="infini", segment_len=4, bptt=0), "bptt"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(seq_len=0), "seq_len must be a positive integer"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(n_heads=0), "n_heads must be a positive integer"),
    (dict(mlp_ratio=0.0), "mlp_ratio must be positive"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(vocab=256), "unknown language-model setting"),
])
def test_bad_settings_raise_one_line_errors(settings, message):
    with pytest.raises(DitlabError, match=message) as info:
        build_lm(**{**TINY, **settings})
    assert "\n" not in str(info.value)


def test_smallest_valid_settings_and_the_defaults():
    build_lm(**{**TINY, "mlp_ratio": 0.5}, attention="infini", segment_len=1, bptt=1)  # all at their lower bounds
    assert ByteLM().settings == dict(vocab_size=256, seq_len=256, d_model=256, n_layers=4, n_heads=4, mlp_ratio=4.0,
                                     norm="rmsnorm", dyt_alpha_init=0.5, pos="rope", attention="vanilla",
                                     segment_len=None, memory_update="linear", gate_init=0.0, bptt="full",
                                     dropout=0.0, embed_scale=False)
    assert ByteLM(attention="infini", segment_len=64).blocks[0].attn.beta.tolist() == [0.0] * 4


def test_vanilla_rejects_inputs_longer_than_its_context():
    model = build_lm(**TINY)
    with pytest.raises(DitlabError, match="longer than the model's context"):
        model(torch.zeros(1, 17, dtype=torch.int64))


def test_bptt_given_as_digits_is_an_integer():
    assert build_lm(**TINY, attention="infini", segment_len=4, bptt="3").settings["bptt"] == 3


@pytest.mark.parametrize("attention", ["vanilla", "infini"])
def test_tiny_model_overfits_a_repeated_string(attention):
    text = b"the quick brown fox jumps over the lazy dog. " * 12
    data = torch.tensor(list(text))
    torch.manual_seed(0)
    model = build_lm(seq_len=32, d_model=32, n_layers=2, n_heads=2, attention=attention, segment_len=8,
                     memory_update="delta", bptt="full")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        starts = torch.randint(0, len(data) - 33, (16,), generator=g)
        w = torch.stack([data[s:s + 33] for s in starts.tolist()])
        loss = model.loss(w[:, :-1], w[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln 256 = 5.55 at initialisation
    assert sum(losses[-5:]) / 5 < 0.5, losses
    # greedy generation continues the string
    assert generate(model, text[:32], 16, temperature=0) == text[32:48]


# --------------------------------------------------------------------------- passkey probe


class NgramCopier(nn.Module):
    """An oracle for the probe: predicts the byte that followed the last earlier occurrence of the
    current 10-byte context (an induction head with unlimited memory)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, 256)
        for b, row in enumerate(x.tolist()):
            text = bytes(row)
            for t in range(10, len(row)):
                j = text.rfind(text[t - 9:t + 1], 0, t)  # an earlier match ending at j + 9 < t
                if j >= 0:
                    logits[b, t, text[j + 10]] = 1.0
        return logits


def test_passkey_sequences_layout():
    tokens, keys = passkey_sequences(2, n_segments=4, segment_len=64, n_trials=5, n_digits=5,
                                     generator=torch.Generator().manual_seed(1))
    assert tokens.shape == (5, 256)
    for row, key in zip(tokens.tolist(), keys):
        text = bytes(row)
        sentence = b" The pass key is " + key + b". Remember it. "
        i = text.find(sentence)
        assert 64 <= i and i + len(sentence) <= 128  # wholly inside segment 4 - 1 - 2 = 1
        assert text.endswith(b" What is the pass key? The pass key is " + key)
        assert len(key) == 5 and key.isdigit()


def test_passkey_accuracy_scores_the_key_digits():
    scores = passkey_accuracy(NgramCopier(), distances=[0, 1, 3], n_segments=4, segment_len=96, n_trials=6)
    assert scores == {k: {"exact": 1.0, "digit": 1.0} for k in (0, 1, 3)}
    # the filler reaches the sequences: a filler that is itself a (wrong) key sentence misleads the copier
    decoy = b" The pass key is 99999. Remember it. "
    fooled = passkey_accuracy(NgramCopier(), distances=[1], n_segments=4, segment_len=96, n_trials=6, filler=decoy)
    assert fooled[1]["exact"] < 1.0
    with pytest.raises(DitlabError):
        passkey_sequences(4, n_segments=4, segment_len=64, n_trials=1)


def test_generate_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    model = build_lm(**TINY)
    a = generate(model, b"hello", 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = generate(model, b"hello", 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a == b and len(a) == 20  # the prompt grows past seq_len=16: the context is cropped
    assert generate(model, b"hello", 5, top_k=1) == generate(model, b"hello", 5, temperature=0)
