"""Architecture variants: each trains, equivalences hold, bad combinations fail clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditlab.cli import main
from ditlab.config import ModelConfig
from ditlab.errors import DitlabError
from ditlab.models.convert import _official_keys
from ditlab.models.dit import DiT, DiTBlock, dit_from_config
from ditlab.models.layers import RoPE, modulate

TINY = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=4)

VARIANTS = {
    "adaln_zero": {},
    "adaln": dict(conditioning="adaln"),
    "cross_attn": dict(conditioning="cross_attn"),
    "in_context": dict(conditioning="in_context"),
    "onehot": dict(class_encoding="onehot"),
    "rope": dict(pos_embed="rope", rope_base=64.0),
    "rope_in_context": dict(pos_embed="rope", conditioning="in_context"),
    "rmsnorm": dict(norm="rmsnorm"),
    "dyt": dict(norm="dyt"),
    "dyt_cross_attn_qk_norm": dict(norm="dyt", conditioning="cross_attn", qk_norm=True),
    "qk_norm": dict(qk_norm=True),
    "layout_3d": dict(token_layout="3d"),
    "layout_3d_rope": dict(token_layout="3d", pos_embed="rope", hidden_size=48),  # head dim 24 = 6k
    "channels_as_tokens": dict(token_layout="channels_as_tokens"),
    "token_dim": dict(token_dim=8),
    "patch_1": dict(patch_size=1),
    "patch_4": dict(patch_size=4),
    "patch_8": dict(patch_size=8),
    "step_size_cond": dict(step_size_cond=True),
    "grad_checkpointing": dict(grad_checkpointing=True),
    "unconditional_onehot": dict(num_classes=0, class_encoding="onehot"),
}


def fit_few_steps(model: DiT, steps: int = 15) -> list[float]:
    """Fit a denoising-style target (the input itself, as eps-prediction at x0 = 0) on one batch."""
    g = torch.Generator().manual_seed(0)
    B, C, S = 8, model.in_channels, model.input_size
    x = torch.randn(B, C, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, max(model.num_classes, 1), (B,), generator=g)
    target = x
    kw = {"dt": torch.rand(B, generator=g) * 100} if model.step_size_cond else {}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(x, t, y, **kw)
        assert out.shape == (B, model.out_channels, S, S)
        loss = F.mse_loss(out[:, :C], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_with_decreasing_loss(name):
    torch.manual_seed(0)
    model = DiT(**{**TINY, "class_dropout_prob": 0.0, **VARIANTS[name]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = fit_few_steps(model)
    assert all(map(lambda v: v == v, losses))  # no NaN
    assert losses[-1] < 0.7 * losses[0], losses
    # The conditioning path is trained too (gradients reach the timestep/label/step embedders).
    after = model.state_dict()
    conditioning = [k for k in after if k.startswith(("t_embedder.", "y_embedder.", "d_embedder."))]
    assert conditioning
    for k in conditioning:
        assert not torch.equal(before[k], after[k]), k


def test_variants_are_off_by_default_and_add_parameters_only_when_on():
    official = set(_official_keys(12))
    model = dit_from_config(ModelConfig(name="DiT-S/4", input_size=8, in_channels=4), learn_sigma=True, step_size_cond=False)
    assert set(model.state_dict()) == official
    keys = lambda **kw: set(DiT(**{**TINY, **kw}).state_dict())  # noqa: E731
    base = keys()
    assert keys(pos_embed="rope") == base - {"pos_embed"}  # RoPE tables are non-persistent buffers
    assert keys(conditioning="adaln") == base
    assert {"d_embedder.mlp.0.weight", "token_in.weight", "final_layer.token_out.weight"} <= keys(step_size_cond=True) | keys(token_dim=8)
    assert not any("adaLN" in k for k in keys(conditioning="in_context"))
    assert any(".cross_attn.kv." in k for k in keys(conditioning="cross_attn"))
    assert "blocks.0.attn.q_norm.weight" in keys(qk_norm=True)


def test_adaln_modulation_is_not_zero_initialised():
    zero, plain = DiT(**TINY), DiT(**TINY, conditioning="adaln")
    assert zero.blocks[0].adaLN_modulation[-1].weight.abs().sum() == 0
    assert plain.blocks[0].adaLN_modulation[-1].weight.abs().sum() > 0


def test_onehot_through_linear_equals_embedding_lookup():
    torch.manual_seed(0)
    onehot = DiT(**TINY, class_encoding="onehot").eval()
    with torch.no_grad():
        for p in onehot.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    table = DiT(**TINY).eval()
    state = dict(onehot.state_dict())
    w = state.pop("y_embedder.linear.weight")  # [hidden, num_classes]
    # Same rows, transposed, plus an all-zero null row.
    state["y_embedder.embedding_table.weight"] = torch.cat([w.t(), torch.zeros(1, w.shape[0])])
    table.load_state_dict(state, strict=True)
    labels = torch.tensor([0, 3, 1, 4])  # 4 = null
    torch.testing.assert_close(onehot.y_embedder(labels, False), table.y_embedder(labels, False), rtol=0, atol=0)
    assert onehot.y_embedder(labels, False)[3].abs().sum() == 0  # null class = zero vector
    x, t = torch.randn(4, 2, 8, 8), torch.tensor([1, 100, 500, 999])
    torch.testing.assert_close(onehot(x, t, labels), table(x, t, labels), rtol=1e-6, atol=1e-6)
    # Label dropout zeroes the class vector.
    dropped = onehot.y_embedder(labels, True, force_drop_ids=torch.ones(4))
    assert dropped.abs().sum() == 0


@pytest.mark.parametrize("base", [10000.0, 64.0])
def test_rope_scores_depend_only_on_relative_position(base):
    grid = (8, 8)
    rope = RoPE(16, grid, base=base)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)

    def score(pq: tuple[int, int], pk: tuple[int, int]) -> float:
        n = grid[0] * grid[1]
        Q, K = torch.zeros(1, 1, n, 16), torch.zeros(1, 1, n, 16)
        iq, ik = pq[0] * grid[1] + pq[1], pk[0] * grid[1] + pk[1]
        Q[0, 0, iq], K[0, 0, ik] = q, k
        return (rope(Q)[0, 0, iq] @ rope(K)[0, 0, ik]).item()

    ref = score((1, 2), (3, 1))
    for shift in [(1, 0), (0, 3), (4, 5), (-1, 2)]:
        moved = score((1 + shift[0], 2 + shift[1]), (3 + shift[0], 1 + shift[1]))
        assert moved == pytest.approx(ref, abs=1e-5)
    assert abs(score((1, 2), (3, 2)) - ref) > 1e-3  # a different offset changes the score
    assert abs(score((1, 2), (2, 1)) - ref) > 1e-3
    assert torch.allclose(rope(q.expand(1, 1, 64, 16)).norm(dim=-1), q.norm())  # a rotation


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = DiT(**TINY, class_dropout_prob=0.0)
    b = DiT(**TINY, class_dropout_prob=0.0, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        with torch.no_grad():
            for p in m.blocks.parameters():
                p.add_(0.01)
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 2])
    a.train()(x, t, y).square().mean().backward()
    b.train()(x, t, y).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_channels_as_tokens_layout_shapes():
    model = DiT(**{**TINY, "in_channels": 3, "token_layout": "channels_as_tokens"})
    assert model.x_embedder.num_patches == 3 * 4 * 4 and model.pos_embed.shape == (1, 48, 32)
    assert model.x_embedder.proj.weight.shape == (32, 1, 1, 2, 2)  # one channel per token
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.shape == (2, 6, 8, 8)


def test_channels_as_tokens_positions_add_a_channel_code_to_the_2d_table():
    """Token (c, i, j) gets the 2-D table's entry of (i, j) plus a full-width sin-cos of c, written
    out here one value at a time from the MAE formula."""
    import math

    C, D, h = 3, 32, 4
    model = DiT(**{**TINY, "in_channels": C, "token_layout": "channels_as_tokens"})
    flat = DiT(**{**TINY, "in_channels": C})  # the 2-D table (checked against the official code elsewhere)
    table, grid2d = model.pos_embed[0].double(), flat.pos_embed[0].double()
    for c in range(C):
        code = [math.sin(c / 10000 ** (k / (D / 2))) for k in range(D // 2)] + \
               [math.cos(c / 10000 ** (k / (D / 2))) for k in range(D // 2)]
        for n in range(h * h):
            want = grid2d[n] + torch.tensor(code, dtype=torch.float64)
            # the code rounded to float32 (|code| <= 1: 2^-24), then the float32 sum (|sum| <= 2: 2^-23)
            torch.testing.assert_close(table[c * h * h + n], want, rtol=0, atol=2.0 ** -24 + 2.0 ** -23)


def test_unpatchify_channels_as_tokens_orders_outputs_eps_then_sigma():
    model = DiT(**{**TINY, "in_channels": 2, "token_layout": "channels_as_tokens"})
    p, h, C, k = 2, 4, 2, 2
    tokens = torch.zeros(1, C * h * h, p * p * k)
    tokens[0, 1 * h * h + 0, 3 * k + 1] = 1.0  # channel 1, token (0,0), pixel (1,1), sigma output
    out = model.unpatchify(tokens)
    assert out.shape == (1, 4, 8, 8)
    assert out[0, 1 * C + 1, 1, 1] == 1 and out.sum() == 1


def test_patch_1_on_28x28_is_practical():
    torch.manual_seed(0)
    model = DiT(input_size=28, patch_size=1, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    assert model.x_embedder.num_patches == 784
    x, t, y = torch.randn(4, 1, 28, 28), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    out = model(x, t, y)
    assert out.shape == (4, 2, 28, 28)
    out.square().mean().backward()
    assert model.x_embedder.proj.weight.grad is not None


@pytest.mark.parametrize("encoding", ["embedding", "onehot"])
def test_unconditional_models_ignore_labels(encoding):
    model = DiT(**{**TINY, "num_classes": 0, "class_encoding": encoding})
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1, 2])
    out = model(x, t, torch.tensor([-1, -1]))  # the sampler's "no label"
    assert torch.equal(out, model(x, t, torch.tensor([3, 0])))  # dataset labels are ignored


def test_step_size_conditioning_needs_dt():
    model = DiT(**TINY, step_size_cond=True)
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    with pytest.raises(DitlabError, match="dt="):
        model(x, t, y)
    with pytest.raises(DitlabError, match="without step_size_cond"):
        DiT(**TINY)(x, t, y, dt=torch.ones(2))
    a = model(x, t, y, dt=torch.tensor([1.0, 1.0]))
    with torch.no_grad():
        model.d_embedder.mlp[2].bias.add_(1.0)  # the step-size embedding reaches the output
        for blk in model.blocks:
            blk.adaLN_modulation[-1].weight.normal_()
        model.final_layer.linear.weight.normal_()
    assert not torch.allclose(model(x, t, y, dt=torch.tensor([1.0, 1.0])), model(x, t, y, dt=torch.tensor([8.0, 8.0])))
    assert a.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("kw, message", [
    (dict(patch_size=3), "patch_size 3 does not divide input_size 8"),
    (dict(pos_embed="rope", hidden_size=24, num_heads=4), "needs a head dim divisible by 4"),
    (dict(pos_embed="rope", token_layout="3d"), "needs a head dim divisible by 6"),
    (dict(hidden_size=30, num_heads=4), "hidden_size 30 is not divisible by num_heads 4"),
    (dict(in_channels=1, token_layout="channels_as_tokens"), "token_layout channels_as_tokens makes channels a token axis"),
    (dict(norm="batchnorm"), "unknown norm 'batchnorm'"),
    (dict(class_encoding="clip"), "unknown class_encoding 'clip'"),
    (dict(pos_embed="learned"), "unknown pos_embed 'learned'"),
    (dict(token_layout="1d"), "unknown token_layout '1d'"),
])
def test_incompatible_combinations_raise(kw, message):
    with pytest.raises(DitlabError, match=message) as e:
        DiT(**{**TINY, **kw})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.patch_size=3"], "patch_size 3 does not divide input_size 28"),
    (["model.pos_embed=rope", "model.hidden_size=36", "model.num_heads=6"], "head dim divisible by 4"),
    (["model.token_layout=channels_as_tokens"], "needs in_channels > 1"),
])
def test_incompatible_combinations_through_the_cli(tmp_path, capsys, overrides, message):
    code = main(["train", f"train.out_dir={tmp_path / 'run'}", "train.steps=1", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def off_init(module: torch.nn.Module) -> torch.nn.Module:
    """The module with its weights moved off the adaLN-Zero initialisation (zero gates and output
    layer, under which attention does not reach the outputs), so that every input matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for v in module.state_dict().values():  # views of the parameters and buffers
            if v.is_floating_point():
                v.add_(0.1 * torch.randn(v.shape, generator=g))
    return module


def test_every_model_option_of_the_config_reaches_the_dit():
    """dit_from_config against the constructor called directly with the same values (none a default)."""
    options = dict(mlp_ratio=2.0, class_dropout_prob=0.3, class_encoding="onehot_mlp", pos_embed="rope",
                   rope_base=64.0, norm="dyt", qk_norm=True, token_dim=8, grad_checkpointing=True)
    cfg = ModelConfig(name="DiT-S/4", **TINY, **options)
    torch.manual_seed(0)
    built = dit_from_config(cfg, learn_sigma=False, step_size_cond=True)
    torch.manual_seed(0)
    direct = DiT(**TINY, learn_sigma=False, step_size_cond=True, **options)
    assert built.grad_checkpointing and built.y_embedder.dropout_prob == 0.3
    sd, ref = built.state_dict(), direct.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    # RoPE's base has no parameter: it shows in the outputs, once the zero-initialised gates are not zero
    ref = off_init(direct).state_dict()
    built.load_state_dict(ref)
    x, t, y, dt = torch.randn(2, 2, 8, 8), torch.tensor([3.0, 7.0]), torch.tensor([1, 2]), torch.tensor([0.5, 0.25])
    built.eval(), direct.eval()
    with torch.no_grad():
        torch.testing.assert_close(built(x, t, y, dt=dt), direct(x, t, y, dt=dt), rtol=0, atol=0)
        other_base = DiT(**TINY, learn_sigma=False, step_size_cond=True, **{**options, "rope_base": 10000.0})
        other_base.load_state_dict(ref)
        assert not torch.equal(other_base.eval()(x, t, y, dt=dt), direct(x, t, y, dt=dt))


def test_guided_forward_passes_the_step_size_on():
    torch.manual_seed(0)
    model = off_init(DiT(**TINY, learn_sigma=False, step_size_cond=True)).eval()
    x, t, y = torch.randn(4, 2, 8, 8), torch.tensor([3.0, 7.0, 3.0, 7.0]), torch.tensor([1, 2, 4, 4])
    dt = torch.tensor([0.5, 0.25, 0.5, 0.25])
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, 3.0, dt=dt)
        out = model(torch.cat([x[:2], x[:2]]), t, y, dt=dt)
        expected = out[2:] + 3.0 * (out[:2] - out[2:])
        torch.testing.assert_close(guided, torch.cat([expected, expected]), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(guided, model.forward_with_cfg(x, t, y, 3.0, dt=dt / 4))


@pytest.mark.parametrize("conditioning", ["adaln_zero", "cross_attn", "in_context"])
def test_blocks_are_pre_norm_residuals_that_use_the_rope_they_are_given(conditioning):
    """Each block against its own sub-layers composed by hand (DiT paper Fig. 3; pre-norm residuals)."""
    torch.manual_seed(0)
    blk = off_init(DiTBlock(32, 2, conditioning=conditioning))
    rope = RoPE(16, (4, 4))
    x = torch.randn(2, 16, 32)
    c = {"adaln_zero": torch.randn(2, 32), "cross_attn": torch.randn(2, 2, 32), "in_context": None}[conditioning]
    with torch.no_grad():
        if conditioning == "adaln_zero":
            shift1, scale1, gate1, shift2, scale2, gate2 = blk.adaLN_modulation(c).chunk(6, dim=1)
            h = x + gate1[:, None] * blk.attn(modulate(blk.norm1(x), shift1, scale1), rope)
            expected = h + gate2[:, None] * blk.mlp(modulate(blk.norm2(h), shift2, scale2))
        else:
            h = x + blk.attn(blk.norm1(x), rope)
            if conditioning == "cross_attn":
                h = h + blk.cross_attn(blk.norm_cross(h), c)
            expected = h + blk.mlp(blk.norm2(h))
        torch.testing.assert_close(blk(x, c, rope), expected, rtol=0, atol=0)
        assert (blk(x, c, None) - expected).abs().max() > 1e-3  # the rotation matters


def _first_block_inputs(model: DiT, *args, **kwargs) -> tuple:
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs))
    with torch.no_grad():
        model(*args, **kwargs)
    handle.remove()
    return seen[0]


def test_what_the_blocks_receive_for_each_conditioning():
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([3.0, 7.0, 9.0]), torch.tensor([1, 2, 0])
    torch.manual_seed(0)
    model = off_init(DiT(**TINY, conditioning="cross_attn")).eval()
    tokens, context, _ = _first_block_inputs(model, x, t, y)
    with torch.no_grad():  # the conditioning vectors as tokens, [B, M, D] (B = 3, M = 2)
        expected = torch.stack([model.t_embedder(t), model.y_embedder(y, False)], dim=1)
    torch.testing.assert_close(context, expected, rtol=0, atol=0)
    # one-hot tokens: the label's bias added to every patch token, after the positions
    torch.manual_seed(0)
    model = off_init(DiT(**TINY, class_encoding="onehot_tokens")).eval()
    tokens, _, _ = _first_block_inputs(model, x, t, y)
    with torch.no_grad():
        expected = model.x_embedder(x) + model.pos_embed + model.y_embedder.token_bias(y)[:, None]
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


def test_onehot_tokens_drop_the_label_in_training():
    torch.manual_seed(0)
    model = off_init(DiT(**{**TINY, "class_dropout_prob": 1.0}, class_encoding="onehot_tokens"))
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3.0, 7.0]), torch.tensor([1, 2])
    null = torch.full_like(y, TINY["num_classes"])
    with torch.no_grad():
        dropped = model.train()(x, t, y)  # every label dropped: the null class, in the tokens too
        torch.testing.assert_close(dropped, model.eval()(x, t, null), rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_values_and_gradients_with_rope():
    torch.manual_seed(0)
    kw = dict(**{**TINY, "class_dropout_prob": 0.0}, pos_embed="rope")
    plain, checkpointed = off_init(DiT(**kw)), DiT(**kw, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3.0, 7.0]), torch.tensor([1, 2])
    outs = [m.train()(x, t, y) for m in (plain, checkpointed)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for out in outs:
        out.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)  # the same kernels, recomputed


@pytest.mark.parametrize("conditioning", ["adaln_zero", "adaln", "cross_attn", "in_context"])
def test_norms_carry_their_own_affine_exactly_when_nothing_modulates_them(conditioning):
    """adaLN's shift and scale replace the norms' affine (official: elementwise_affine=False); the
    cross-attention and in-context blocks of the DiT paper use standard affine LayerNorms."""
    model = DiT(**TINY, conditioning=conditioning, qk_norm=True)
    affine = conditioning in ("cross_attn", "in_context")
    block = model.blocks[0]
    norms = [block.norm1, block.norm2, model.final_layer.norm_final]
    assert [n.weight is not None and n.bias is not None for n in norms] == [affine] * 3
    if conditioning == "cross_attn":
        assert block.norm_cross.weight is not None and block.norm_cross.bias is not None
        assert hasattr(block.cross_attn, "q_norm") and hasattr(block.cross_attn, "k_norm")  # qk_norm reaches it


def test_the_step_size_embedder_starts_like_the_timestep_embedder():
    """Both MLPs' weights N(0, 0.02) as the official t_embedder (not the xavier init every other Linear gets)."""
    torch.manual_seed(0)
    model = DiT(**{**TINY, "hidden_size": 64}, step_size_cond=True)
    for name in ("t_embedder", "d_embedder"):
        for i in (0, 2):
            w = getattr(model, name).mlp[i].weight.detach().double()
            # The sample std of n normal draws has a relative standard error 1/sqrt(2n); allow 6 of them.
            # (xavier_uniform here would give std sqrt(2 / (fan_in + fan_out)) >= 0.072.)
            assert abs(w.std().item() / 0.02 - 1) < 6 / (2 * w.numel()) ** 0.5, (name, i, w.std().item())


def test_the_constructors_defaults_are_the_official_dit_xl_2():
    """DiT() as the official DiT.__init__: input 32, patch 2, 4 channels, hidden 1152, depth 28, 16 heads,
    label dropout 0.1, 1000 classes, learned sigma (675,129,632 parameters, printed by the official code)."""
    with torch.device("meta"):
        model = DiT()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    assert (model.input_size, model.patch_size, model.in_channels, model.out_channels, model.num_heads) == (32, 2, 4, 8, 16)
    assert model.num_classes == 1000 and model.y_embedder.dropout_prob == 0.1
    assert model.learn_sigma is True and DiT(**TINY, learn_sigma=False).learn_sigma is False
    assert model.grad_checkpointing is False and len(model.blocks) == 28


def test_rope_default_base_is_10000():
    def table(**kw) -> torch.Tensor:
        return DiT(**TINY, pos_embed="rope", **kw).rope.cos

    assert torch.equal(table(), table(rope_base=10000.0)) and not torch.equal(table(), table(rope_base=10001.0))


@pytest.mark.parametrize("norm, kind", [("layernorm", torch.nn.LayerNorm), ("rmsnorm", torch.nn.RMSNorm), ("dyt", None)])
def test_every_norm_of_the_model_is_the_configured_kind(norm, kind):
    from ditlab.models.layers import DyT

    model = DiT(**TINY, norm=norm)
    kind = kind or DyT
    norms = [blk.norm1 for blk in model.blocks] + [blk.norm2 for blk in model.blocks] + [model.final_layer.norm_final]
    assert all(type(n) is kind for n in norms), [type(n).__name__ for n in norms]


def test_in_context_rope_with_a_step_size_rotates_three_condition_tokens():
    """In-context conditioning prepends t, y and dt as tokens: RoPE must cover 3 extra tokens (2 without dt)."""
    torch.manual_seed(0)
    for step_size_cond, extra in ((True, 3), (False, 2)):
        model = DiT(**TINY, conditioning="in_context", pos_embed="rope", step_size_cond=step_size_cond, learn_sigma=False)
        assert model.rope.cos.shape[0] == (8 // 2) ** 2 + extra  # a row per token, condition tokens unrotated
        x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
        out = model(x, t, y, dt=torch.tensor([0.5, 0.25]) if step_size_cond else None)
        assert out.shape == (2, 2, 8, 8)


def test_token_dim_is_checked_through_the_constructor():
    with pytest.raises(DitlabError, match="token_dim must be >= 1"):
        DiT(**TINY, token_dim=0)
