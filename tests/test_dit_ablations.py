"""DiT ablations of the research notes: the class encodings and the 3-D (video-style) token layout.

Every class encoding must give the null label its own input (what label dropout produces, what
classifier-free guidance compares against); the 3-D layout must run on 1-channel MNIST.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file

from ditlab.cli import main
from ditlab.errors import DitlabError
from ditlab.models.dit import CLASS_ENCODINGS, DiT, forward_with_cfg_doubled
from ditlab.models.layers import sincos_2d, sincos_3d
from ditlab.objectives.guidance import guided_forward

torch.set_num_threads(1)

NUM_CLASSES = 4
TINY = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)


def perturbed(seed: int = 0, **kw) -> DiT:
    """A tiny DiT with every weight moved off its (partly zero) init, so every input reaches the output."""
    torch.manual_seed(seed)
    model = DiT(**{**TINY, **kw})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def inputs(batch: int = 3, channels: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, torch.arange(batch) % NUM_CLASSES


def test_every_encoding_is_offered():
    assert set(CLASS_ENCODINGS) == {"embedding", "onehot", "onehot_mlp", "onehot_tokens", "scalar"}


@pytest.mark.parametrize("layout", ["2d", "3d"])
@pytest.mark.parametrize("encoding", CLASS_ENCODINGS)
def test_shapes(encoding, layout):
    model = perturbed(class_encoding=encoding, token_layout=layout)
    x, t, y = inputs()
    assert model.y_embedder(y, False).shape == (3, 32)
    assert model(x, t, y).shape == (3, 4, 8, 8)
    assert model(x, t, torch.full_like(y, NUM_CLASSES)).shape == (3, 4, 8, 8)  # the null label


def test_onehot_keeps_its_state_dict_keys():
    """Runs saved with class_encoding=onehot (bias-free Linear) must keep loading."""
    keys = lambda **kw: set(DiT(**{**TINY, **kw}).state_dict())  # noqa: E731
    base = keys() - {"y_embedder.embedding_table.weight"}
    assert keys(class_encoding="onehot") == base | {"y_embedder.linear.weight"}
    assert DiT(**TINY, class_encoding="onehot").state_dict()["y_embedder.linear.weight"].shape == (32, NUM_CLASSES)
    assert keys(class_encoding="onehot_mlp") - base == {f"y_embedder.mlp.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    assert keys(class_encoding="onehot_tokens") - keys(class_encoding="onehot_mlp") == {"y_embedder.to_tokens.weight"}
    assert "y_embedder.null_embedding" in keys(class_encoding="scalar")
    assert "y_embedder.null_embedding" not in keys(class_encoding="scalar", class_dropout_prob=0.0)


@pytest.mark.parametrize("encoding", CLASS_ENCODINGS)
def test_null_class_is_its_own_input_and_what_dropout_gives(encoding):
    model = perturbed(class_encoding=encoding)
    emb = model.y_embedder
    with torch.no_grad():
        table = emb(torch.arange(NUM_CLASSES + 1), False)
    assert (table[:-1] - table[-1]).norm(dim=1).min() > 1e-3  # the null differs from every real class
    y = torch.tensor([0, 3, 1, 2])
    null = torch.full_like(y, NUM_CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(emb(y, True, force_drop_ids=torch.ones_like(y)), emb(null, False), rtol=0, atol=0)
        torch.testing.assert_close(emb(y, True, force_drop_ids=torch.zeros_like(y)), emb(y, False), rtol=0, atol=0)
        emb.dropout_prob = 1.0  # random dropout while training: every label dropped
        torch.testing.assert_close(emb(y, True), emb(null, False), rtol=0, atol=0)
        torch.testing.assert_close(emb(y, False), table[y], rtol=0, atol=0)  # no dropout in eval
        emb.dropout_prob = 0.1
    # Through the whole model (onehot_tokens: both the token and the adaLN path see the null).
    x, t, _ = inputs(4)
    with torch.no_grad():
        uncond, cond = model(x, t, null), model(x, t, y)
        model.train()
        torch.testing.assert_close(model(x, t, y, force_drop_ids=torch.ones_like(y)), uncond, rtol=0, atol=1e-6)
        torch.testing.assert_close(model(x, t, y, force_drop_ids=torch.zeros_like(y)), cond, rtol=0, atol=1e-6)
        mixed = model(x, t, y, force_drop_ids=torch.tensor([1, 0, 0, 1]))
    torch.testing.assert_close(mixed[[1, 2]], cond[[1, 2]], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[[0, 3]], uncond[[0, 3]], rtol=0, atol=1e-6)
    assert (cond - uncond).abs().amax(dim=(1, 2, 3)).min() > 1e-4


@pytest.mark.parametrize("encoding", CLASS_ENCODINGS)
def test_classifier_free_guidance(encoding):
    model = perturbed(class_encoding=encoding)
    x, t, y = inputs()
    null, s, C = torch.full_like(y, NUM_CLASSES), 3.0, model.in_channels
    with torch.no_grad():
        assert torch.equal(guided_forward(model, x, t, y, 1.0), model(x, t, y))
        out = guided_forward(model, x, t, y, s)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        assert torch.equal(out[:, :C], uncond[:, :C] + s * (cond[:, :C] - uncond[:, :C]))
        assert torch.equal(out[:, C:], cond[:, C:])
        assert (out - cond).abs().max() > 1e-4  # guidance changed something
        # The official convention: doubled batch [z; z] with labels [y; null], the same guided half.
        doubled = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), s)
        assert torch.equal(doubled[:3], out) and torch.equal(doubled[3:, :C], out[:, :C])
        assert torch.equal(doubled, forward_with_cfg_doubled(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), s))


@pytest.mark.parametrize("encoding", CLASS_ENCODINGS)
def test_guidance_refuses_an_untrained_null(encoding):
    model = perturbed(class_encoding=encoding, class_dropout_prob=0.0)
    x, t, y = inputs()
    assert torch.equal(guided_forward(model, x, t, y, 1.0), model(x, t, y))  # scale 1 needs no null
    with pytest.raises(DitlabError, match="null label") as e:
        guided_forward(model, x, t, y, 2.0)
    assert "\n" not in str(e.value)


def test_scalar_without_dropout_refuses_the_null_label():
    model = perturbed(class_encoding="scalar", class_dropout_prob=0.0)
    x, t, y = inputs()
    with pytest.raises(DitlabError, match="class_dropout_prob=0"):
        model(x, t, torch.full_like(y, NUM_CLASSES))


def test_onehot_tokens_reach_the_tokens_without_the_adaln_path():
    """Zero the label's contribution to c: onehot_tokens still sees the label, onehot_mlp does not."""
    x, t, _ = inputs(2)
    y0, y1 = torch.tensor([0, 2]), torch.tensor([1, 3])

    def label_effect(encoding: str, zero_tokens: bool = False) -> float:
        model = perturbed(class_encoding=encoding)
        with torch.no_grad():
            model.y_embedder.mlp[2].weight.zero_()  # y's embedding in c is now 0 for every label
            model.y_embedder.mlp[2].bias.zero_()
            if zero_tokens:
                model.y_embedder.to_tokens.weight.zero_()
            return (model(x, t, y0) - model(x, t, y1)).abs().max().item()

    assert label_effect("onehot_tokens") > 1e-3
    assert label_effect("onehot_mlp") == 0.0
    assert label_effect("onehot_tokens", zero_tokens=True) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalar_encoding_orders_labels(seed):
    """At init, a label's neighbour (|a - b| = 1) is nearer than any label 3 or more away; a lookup
    table (embedding, one-hot) has no such order."""

    def ordered(encoding: str) -> bool:
        torch.manual_seed(seed)
        model = DiT(**{**TINY, "num_classes": 10, "class_encoding": encoding})
        with torch.no_grad():
            d = torch.cdist(*[model.y_embedder(torch.arange(10), False)] * 2)
        neighbours = [(a, b) for a in range(10) for b in (a - 1, a + 1) if 0 <= b < 10]
        return all(d[a, b] < d[a, c] for a, b in neighbours for c in range(10) if abs(a - c) >= 3)

    assert ordered("scalar")
    assert not ordered("embedding") and not ordered("onehot_mlp")


# --------------------------------------------------------------------------- 3-D token layout


def test_sincos_3d_matches_a_hand_computed_table():
    dim, frames, side = 16, 2, 2
    table = sincos_3d(dim, frames, side)
    assert table.shape == (frames * side * side, dim)

    def sincos(pos: int, d: int) -> list[float]:  # [sin(p w_i)..., cos(p w_i)...], w_i = 10000^(-2i/d)
        w = [10000 ** (-2 * i / d) for i in range(d // 2)]
        return [math.sin(pos * wi) for wi in w] + [math.cos(pos * wi) for wi in w]

    for f in range(frames):
        for r in range(side):
            for c in range(side):
                # frame in dim/4 = 4 dims, then column and row in 3*dim/8 = 6 dims each
                expected = sincos(f, 4) + sincos(c, 6) + sincos(r, 6)
                row = table[f * side * side + r * side + c]
                torch.testing.assert_close(row, torch.tensor(expected), rtol=0, atol=1e-6)


def test_3d_layout_with_one_frame_is_2d_attention_with_another_position_code():
    model3 = perturbed(token_layout="3d", in_channels=1)
    assert model3.x_embedder.grid == (1, 4, 4) and model3.x_embedder.num_patches == 16  # as many tokens as 2-D
    assert model3.x_embedder.proj.weight.shape == (32, 1, 1, 2, 2)  # Conv3d, (1, p, p) patches, any C
    torch.testing.assert_close(model3.pos_embed[0], sincos_3d(32, 1, 4), rtol=0, atol=0)
    assert not torch.allclose(model3.pos_embed[0], sincos_2d(32, 4))
    # Copy the weights into a 2-D model (Conv3d kernel (1,p,p) -> Conv2d (p,p), same position
    # table): identical outputs, so the 3-D model is 2-D attention over the same tokens.
    model2 = DiT(**{**TINY, "in_channels": 1}).eval()
    state = dict(model3.state_dict())
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"].squeeze(2)
    model2.load_state_dict(state, strict=True)
    x, t, y = inputs(channels=1)
    with torch.no_grad():
        torch.testing.assert_close(model3(x, t, y), model2(x, t, y), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(token_layout="3d", hidden_size=24, num_heads=2), "needs hidden_size divisible by 16"),
    (dict(token_layout="channels_as_tokens", in_channels=1), "needs in_channels > 1"),
    (dict(class_encoding="scalar", num_classes=0), "class_encoding scalar needs num_classes > 0"),
    (dict(class_encoding="onehot_tokens", num_classes=0), "class_encoding onehot_tokens needs num_classes > 0"),
])
def test_conflicting_settings_are_one_line_errors(kw, message):
    with pytest.raises(DitlabError, match=message) as e:
        DiT(**{**TINY, **kw})
    assert "\n" not in str(e.value)


def test_3d_layout_trains_on_mnist_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", f"train.out_dir={run}", "data.source=mnist-embedded", "model.token_layout=3d",
               "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
               "model.class_encoding=onehot_tokens", "objective.kind=flow", "optim.batch_size=16",
               "optim.lr=2e-3", "optim.grad_clip=1.0", "train.steps=30", "train.log_every=10",
               "train.ckpt_every=30", "train.tensorboard=false", "train.progress=false",
               "sample.sampler=euler", "sample.steps=2", "sample.num_samples=4", "sample.batch_size=4"])
    assert rc == 0, capsys.readouterr().err
    losses = [float(r["loss"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    assert losses[-1] < 0.85 * losses[0], losses
    weights = load_file(run / "checkpoints" / "step_0000030" / "model.safetensors")
    assert weights["x_embedder.proj.weight"].shape == (32, 1, 1, 4, 4)  # Conv3d on 1-channel MNIST
