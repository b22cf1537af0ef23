"""The ADM-style U-Net baseline: shapes, conditioning, training signal, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
