"""The ADM-style U-Net baseline: shapes, conditioning, training signal, config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ditlab.cli import main
from ditlab.config import Config, ModelConfig, load_config
from ditlab.errors import DitlabError
from ditlab.models import build_model
from ditlab.models.unet import UNet


def tiny(**kw) -> UNet:
    args = dict(input_size=28, in_channels=1, model_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[7])
    args.update(kw)
    torch.manual_seed(0)
    return UNet(**args)


def perturb(m: UNet) -> UNet:
    """Give every (partly zero-initialised) weight some noise so conditioning paths show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def inputs(b: int = 4, c: int = 1, side: int = 28):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, c, side, side, generator=g), torch.randint(0, 1000, (b,), generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_shapes_and_attributes(learn_sigma):
    m = tiny(learn_sigma=learn_sigma)
    x, t, y = inputs()
    out = m(x, t, y)
    assert out.shape == (4, 2 if learn_sigma else 1, 28, 28)
    assert (m.in_channels, m.out_channels, m.learn_sigma, m.num_classes, m.input_size) == (1, out.shape[1], learn_sigma, 10, 28)
    # Zero-initialised output conv: the untrained model predicts exactly zero (ADM).
    assert torch.count_nonzero(out) == 0


def test_resolutions_and_skips_on_28x28():
    m = tiny(num_res_blocks=2, attn_resolutions=[14, 7])
    seen = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: seen.append(o.shape[-1])) for mod in m.down]
    m(*inputs())
    for h in hooks:
        h.remove()
    # 2 res blocks per level + a downsample after levels 0 and 1: 28 28 14 | 14 14 7 | 7 7
    assert seen == [28, 28, 14, 14, 14, 7, 7, 7]
    n_attn = sum(type(mod).__name__ == "AttentionBlock" for mod in m.modules())
    assert n_attn == 2 * 2 + 1 + 2 * 3  # down (2 levels x 2), middle, up (2 levels x 3)


def test_time_class_and_step_size_change_the_output():
    m = tiny(step_size_cond=True).eval()
    perturb(m)
    x, t, y = inputs()
    dt = torch.full((4,), 0.25)
    ref = m(x, t, y, dt=dt)
    assert ref.shape == (4, 1, 28, 28)
    assert not torch.allclose(ref, m(x, t + 100, y, dt=dt))
    assert not torch.allclose(ref, m(x, t, (y + 1) % 10, dt=dt))
    assert not torch.allclose(ref, m(x, t, y, dt=dt * 2))
    with pytest.raises(DitlabError, match="step size"):
        m(x, t, y)
    with pytest.raises(DitlabError, match="step_size_cond"):
        tiny()(x, t, y, dt=dt)


def test_cfg_null_label_and_label_dropout():
    m = tiny(class_dropout_prob=0.1).eval()
    perturb(m)
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    cond, uncond = m(x, t, y), m(x, t, null)
    # The null label (index num_classes) is a real embedding row, distinct from every class.
    assert not torch.allclose(cond, uncond)
    # In training mode labels are dropped to the null label with class_dropout_prob.
    m_drop = tiny(class_dropout_prob=1.0).train()
    torch.testing.assert_close(m_drop.y_embedder(y, True), m_drop.y_embedder(null, False))


def test_forward_with_cfg_follows_the_official_doubled_batch_convention():
    # Official DiT API (sample.py): x = [z; z], y = [labels; null]; both output halves guided.
    m = tiny(class_dropout_prob=0.1, learn_sigma=True).eval()
    perturb(m)
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    s = 3.0
    out = m.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), s)
    assert out.shape == (8, 2, 28, 28)
    # Exactly the formula on the doubled batch it runs ...
    cond2, uncond2 = m(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    want2 = uncond2[:, :1] + s * (cond2[:, :1] - uncond2[:, :1])
    assert torch.equal(out[:4, :1], want2) and torch.equal(out[4:, :1], want2)
    assert torch.equal(out[:4, 1:], cond2[:, 1:]) and torch.equal(out[4:, 1:], uncond2[:, 1:])  # sigma: passed through
    # ... and against separate forwards up to the batching error measured here (test_dit.py explains).
    cond, uncond = m(x, t, y), m(x, t, null)
    du, dc = (uncond2 - uncond).abs().max(), (cond2 - cond).abs().max()
    ulp = torch.finfo(torch.float32).eps * max(cond.abs().max(), uncond.abs().max())
    want = uncond[:, :1] + s * (cond[:, :1] - uncond[:, :1])
    assert (out[:4, :1] - want).abs().max() <= abs(1 - s) * du + s * dc + 4 * ulp
    # One forward pass of the doubled batch (2B), as in the official code, not 4B.
    seen = []
    hook = m.input_conv.register_forward_hook(lambda mod, i, o: seen.append(o.shape[0]))
    m.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0)
    hook.remove()
    assert seen == [8]


def test_unconditional_ignores_labels():
    m = tiny(num_classes=0).eval()
    perturb(m)
    x, t, y = inputs()
    torch.testing.assert_close(m(x, t, y), m(x, t, (y + 3) % 10))
    assert m.y_embedder is None


def test_gradient_checkpointing_matches():
    x, t, y = inputs()
    grads = []
    for ckpt in (False, True):
        m = tiny(grad_checkpointing=ckpt, class_dropout_prob=0.0).train()
        perturb(m)
        m(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_trains_with_gaussian_objective():
    cfg = load_config(None, ["model.name=unet", "model.unet_channels=16", "model.unet_num_res_blocks=1",
                             "objective.diffusion_steps=100"])
    from ditlab.objectives import build_objective

    model = build_model(cfg)
    assert isinstance(model, UNet) and model.learn_sigma and model.out_channels == 2
    objective = build_objective(cfg)
    g = torch.Generator().manual_seed(0)
    # A fixed batch of structured images: the loss must fall when fitting it.
    x0 = torch.zeros(16, 1, 28, 28)
    x0[:, :, 8:20, 10:18] = 1.0
    x0 = x0 * 2 - 1
    y = torch.arange(16) % 10
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            return objective.loss(model, x0, y, generator=torch.Generator().manual_seed(123))["loss"].item()

    before = eval_loss()
    for _ in range(15):
        loss = objective.loss(model, x0, y, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_build_model_shortcut_gets_dt():
    cfg = load_config(None, ["model.name=unet", "model.unet_channels=16", "model.unet_num_res_blocks=1", "objective.kind=shortcut"])
    m = build_model(cfg)
    assert m.step_size_cond and not m.learn_sigma and m.dt_embedder is not None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.input_size=30"], "not divisible by 4"),
        (["model.unet_attn_resolutions=[8]"], "match none of the U-Net resolutions"),
        (["model.unet_channel_mult=[]"], "non-empty"),
        (["model.unet_dropout=1.5"], "unet_dropout"),
        (["model.norm=rmsnorm"], "does not use the DiT option"),
        (["model.class_encoding=bogus"], "class_encoding"),
    ],
)
def test_bad_configs(overrides, message):
    cfg = load_config(None, ["model.name=unet", "model.unet_channels=16", *overrides])
    with pytest.raises(DitlabError, match=message):
        build_model(cfg)


def test_bad_config_through_cli(tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "mnist_unet.yaml"
    code = main(["train", str(config), "model.input_size=30", f"train.out_dir={tmp_path / 'run'}", "train.steps=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "not divisible" in err and len(err.strip().splitlines()) == 1


def test_config_file_builds():
    path = Path(__file__).resolve().parents[1] / "configs" / "mnist_unet.yaml"
    cfg = load_config(path)
    m = build_model(cfg)
    assert isinstance(m, UNet) and m.input_size == cfg.model.input_size == 28
    assert isinstance(cfg, Config) and isinstance(cfg.model, ModelConfig)


# ---- each block against its definition, composed by hand on weights moved off their zero init ----


def test_group_norm_takes_the_largest_divisor_of_the_width_up_to_32():
    from ditlab.models.unet import group_norm

    assert [group_norm(c).num_groups for c in (16, 24, 48, 64, 96, 7)] == [16, 8, 16, 32, 32, 1]


@pytest.mark.parametrize("in_ch, out_ch", [(8, 16), (16, 16)])
def test_resblock_is_adm_scale_shift_composed_by_hand(in_ch, out_ch):
    """out = skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x)))) * (1 + scale) + shift)), [scale, shift] = Linear(SiLU(emb))."""
    from ditlab.models.unet import ResBlock

    torch.manual_seed(0)
    blk = perturb(ResBlock(in_ch, out_ch, emb_dim=12, dropout=0.0)).eval()
    x, emb = torch.randn(3, in_ch, 6, 6), torch.randn(3, 12)
    gn1, conv1 = blk.in_layers[0], blk.in_layers[2]
    linear, gn2, conv2 = blk.emb_layers[1], blk.out_norm, blk.out_layers[2]
    with torch.no_grad():
        h = F.conv2d(F.silu(F.group_norm(x, math.gcd(32, in_ch), gn1.weight, gn1.bias)), conv1.weight, conv1.bias, padding=1)
        e = F.linear(F.silu(emb), linear.weight, linear.bias)
        scale, shift = e[:, :out_ch, None, None], e[:, out_ch:, None, None]
        h = F.group_norm(h, math.gcd(32, out_ch), gn2.weight, gn2.bias) * (1 + scale) + shift
        skip = x if in_ch == out_ch else F.conv2d(x, blk.skip.weight, blk.skip.bias)
        expected = skip + F.conv2d(F.silu(h), conv2.weight, conv2.bias, padding=1)
        torch.testing.assert_close(blk(x, emb), expected, rtol=0, atol=0)
    assert isinstance(blk.skip, torch.nn.Identity) == (in_ch == out_ch)


def test_attention_block_is_multi_head_softmax_attention_against_a_float64_loop():
    from ditlab.models.unet import AttentionBlock

    torch.manual_seed(0)
    c, heads, hw = 128, 2, 5  # 64 channels per head
    blk = perturb(AttentionBlock(c)).eval()
    assert blk.num_heads == heads and blk.norm.num_groups == 32
    x = torch.randn(2, c, hw, hw)
    with torch.no_grad():
        got = blk(x)
        xd = x.double()
        n = F.group_norm(xd, 32, blk.norm.weight.double(), blk.norm.bias.double())
        qkv = F.conv2d(n, blk.qkv.weight.double(), blk.qkv.bias.double()).flatten(2)  # [B, 3C, HW]
        d = c // heads
        out = torch.zeros(2, c, hw * hw, dtype=torch.float64)
        for b in range(2):
            for h in range(heads):
                q, k, v = (qkv[b, part * c + h * d: part * c + (h + 1) * d] for part in range(3))  # [d, HW]
                weights = torch.softmax(q.T @ k / math.sqrt(d), dim=-1)  # [HW queries, HW keys]
                out[b, h * d:(h + 1) * d] = (weights @ v.T).T
        expected = xd + F.conv2d(out.reshape(2, c, hw, hw), blk.proj.weight.double(), blk.proj.bias.double())
    # float32 against float64: sums of at most 3C = 384 terms of O(1) values, relative error ~ K u.
    err = (got.double() - expected).abs().max().item()
    assert err <= 384 * torch.finfo(torch.float32).eps * expected.abs().max().item(), err


def test_down_and_upsampling_are_a_stride_2_conv_and_nearest_then_conv():
    from ditlab.models.unet import Downsample, Upsample

    torch.manual_seed(0)
    down, up = Downsample(4), Upsample(4)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(down(x), F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1), rtol=0, atol=0)
        nearest = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
        torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1), rtol=0, atol=0)
    assert down(x).shape == (2, 4, 3, 3) and up(x).shape == (2, 4, 12, 12)


def test_unet_wiring_skips_last_in_first_out_and_one_conditioning_vector_for_every_block():
    """The up path eats the down path's outputs in reverse order, each concatenated after the
    running features; every residual block gets emb = t_emb + y_emb (+ dt_emb); the head is
    GN -> SiLU -> conv of the last up stage's output."""
    from ditlab.models.unet import ResBlock

    m = perturb(tiny(num_res_blocks=2, step_size_cond=True)).eval()
    x, t, y = inputs()
    dt = torch.full((4,), 0.125)
    stem, downs, ups, embs = [], [], [], []
    hooks = [m.input_conv.register_forward_hook(lambda mod, i, o: stem.append(o))]
    hooks += [s.register_forward_hook(lambda mod, i, o: downs.append(o)) for s in m.down]
    hooks += [m.middle.register_forward_hook(lambda mod, i, o: downs.append(o))]
    hooks += [s.register_forward_hook(lambda mod, i, o: ups.append((i[0], o))) for s in m.up]
    hooks += [b.register_forward_pre_hook(lambda mod, i: embs.append(i[1])) for b in m.modules() if isinstance(b, ResBlock)]
    with torch.no_grad():
        out = m(x, t, y, dt=dt)
        emb = m.t_embedder(t) + m.y_embedder(y, False) + m.dt_embedder(dt)
        g = m.out[0]
        head = F.conv2d(F.silu(F.group_norm(ups[-1][1], g.num_groups, g.weight, g.bias)), m.out[2].weight, m.out[2].bias, padding=1)
    for h in hooks:
        h.remove()
    skips = stem + downs[:-1]  # the middle's output is the running features, not a skip
    assert len(ups) == len(skips) == 3 * 3
    running = downs[-1]
    for (stage_in, stage_out), skip in zip(ups, reversed(skips)):
        torch.testing.assert_close(stage_in, torch.cat([running, skip], dim=1), rtol=0, atol=0)
        running = stage_out
    assert embs and all(torch.equal(e, emb) for e in embs)
    torch.testing.assert_close(out, head, rtol=0, atol=0)


def test_direct_construction_and_the_config_build_the_same_u_net():
    """UNet()'s defaults are ModelConfig's unet_* defaults (ADM: emb dim 4 x channels, t frequencies
    = channels), and every config field reaches the model."""
    from ditlab.models.layers import LabelEmbedder

    direct, built = UNet(), UNet.from_config(ModelConfig(name="unet"), learn_sigma=False, step_size_cond=False)
    assert {k: v.shape for k, v in direct.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert (direct.input_size, direct.in_channels, direct.num_classes, direct.grad_checkpointing) == (28, 1, 10, False)
    assert direct.y_embedder.dropout_prob == 0.1 and isinstance(direct.y_embedder, LabelEmbedder)
    assert direct.t_embedder.mlp[0].in_features == 64 and direct.t_embedder.mlp[0].out_features == 4 * 64
    assert len([b for b in direct.down if type(b[0]).__name__ == "ResBlock"]) == 3 * 2
    m = ModelConfig(name="unet", input_size=16, in_channels=3, unet_channels=8, unet_channel_mult=[1, 2],
                    unet_num_res_blocks=1, unet_attn_resolutions=[8], unet_dropout=0.25, num_classes=4,
                    class_dropout_prob=0.5, class_encoding="onehot", grad_checkpointing=True)
    net = UNet.from_config(m, learn_sigma=True, step_size_cond=True)
    assert (net.input_size, net.in_channels, net.out_channels, net.num_classes, net.grad_checkpointing) == (16, 3, 6, 4, True)
    assert net.input_conv.out_channels == 8 and net.t_embedder.mlp[0].in_features == 8 and net.dt_embedder.mlp[0].in_features == 8
    assert len(net.down) == 2 + 1 and net.y_embedder.dropout_prob == 0.5
    assert [mod.p for mod in net.modules() if isinstance(mod, torch.nn.Dropout)] == [0.25] * (2 + 2 + 2 * 2)  # down, middle, up
    assert type(net.y_embedder).__name__ == "OneHotLabelEmbedder"
    assert UNet(num_classes=1).y_embedder is not None and UNet(num_classes=0).y_embedder is None


def test_gradient_checkpointing_runs_only_when_training_with_gradients(monkeypatch):
    import ditlab.models.unet as unet_module

    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)
    x, t, y = inputs(b=2)
    for ckpt, train, grad in [(True, True, True), (False, True, True), (True, False, True), (True, True, False)]:
        calls.clear()
        m = tiny(grad_checkpointing=ckpt, class_dropout_prob=0.0).train(train)
        with torch.set_grad_enabled(grad):
            m(x, t, y)
        stages = len(m.down) + 1 + len(m.up)
        assert len(calls) == (stages if ckpt and train and grad else 0), (ckpt, train, grad)
        assert all(c == {"use_reentrant": False} for c in calls)


def test_labels_are_dropped_in_training_and_by_force_drop_ids():
    m = perturb(tiny(class_dropout_prob=1.0))
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    with torch.no_grad():
        unconditional = m.eval()(x, t, null)
        torch.testing.assert_close(m.train()(x, t, y), unconditional, rtol=0, atol=0)  # every label dropped
        m.eval()
        torch.testing.assert_close(m(x, t, y, force_drop_ids=torch.ones_like(y)), unconditional, rtol=0, atol=0)
        assert not torch.allclose(m(x, t, y), unconditional)


def test_forward_with_cfg_passes_the_step_size_on():
    m = perturb(tiny(step_size_cond=True)).eval()
    x, t, y = inputs()
    dt = torch.full((4,), 0.5)
    with torch.no_grad():
        guided = m.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 2.0,
                                    dt=torch.cat([dt, dt]))
        cond, uncond = m(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), dt=torch.cat([dt, dt])).chunk(2)
    torch.testing.assert_close(guided[:4], uncond + 2.0 * (cond - uncond), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["input_size", "in_channels", "model_channels", "num_res_blocks"])
def test_each_size_alone_must_be_positive_and_one_is_enough(name):
    base = dict(input_size=8, in_channels=1, model_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[])
    UNet(**{**base, name: 1})
    with pytest.raises(DitlabError, match="must be positive"):
        UNet(**{**base, name: 0})


def test_level_count_bounds_the_input_size_and_dropout_stays_below_one():
    # Four levels halve three times: 12 is not divisible by 8 (though it is by 2 x 3).
    with pytest.raises(DitlabError, match="not divisible by 8"):
        UNet(input_size=12, model_channels=8, channel_mult=[1, 1, 1, 1], attn_resolutions=[])
    UNet(input_size=16, model_channels=8, channel_mult=[1, 1, 1, 1], attn_resolutions=[2])
    with pytest.raises(DitlabError, match="unet_dropout"):
        UNet(model_channels=8, dropout=1.0)
    from ditlab.models.unet import AttentionBlock, Downsample

    assert AttentionBlock(32).num_heads == 1 and AttentionBlock(192).num_heads == 3  # 64 channels per head, at least one
    assert Downsample(4).conv.kernel_size == (3, 3)  # ADM: a 3x3 stride-2 conv
