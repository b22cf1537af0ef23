"""The official-compatible DiT: parameter counts, state_dict layout, init, forward, guidance."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from ditlab.config import Config, ModelConfig
from ditlab.objectives.guidance import guided_forward
from ditlab.errors import DitlabError
from ditlab.models import build_model
from ditlab.models.dit import DiT, DiT_models, dit_from_config

# Parameter counts printed by the official facebookresearch/DiT models.py (DiT_models[name]()
# at input_size=32, in_channels=4, num_classes=1000, learn_sigma=True; timm 1.0.31), 2026-11-27.
OFFICIAL_PARAM_COUNTS = {
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
}

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(**{**TINY, **kw})


def randomize_(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_parameter_counts_match_official_for_all_12_configs():
    assert list(DiT_models) == list(OFFICIAL_PARAM_COUNTS)
    with torch.device("meta"):  # no memory, no init cost
        for name, ctor in DiT_models.items():
            model = ctor(input_size=32, in_channels=4, num_classes=1000)
            assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAM_COUNTS[name], name


def test_named_constructors_are_the_table_entries():
    # DiT_XL_2 ... DiT_S_8 stay importable by their official names and build the sizes they name.
    import ditlab.models.dit as dit

    with torch.device("meta"):
        for name, ctor in DiT_models.items():
            size, patch = name[len("DiT-"):].split("/")
            assert getattr(dit, f"DiT_{size}_{patch}") is ctor and ctor.__name__ == f"DiT_{size}_{patch}"
            m = ctor(input_size=32, in_channels=4, num_classes=1000)
            assert (len(m.blocks), m.x_embedder.proj.out_channels, m.num_heads, m.patch_size) == (*dit.DIT_SIZES[size], int(patch))
            # keyword arguments other than the official defaults (32, 4, 1000, learn_sigma) reach the model
            m = ctor(input_size=16, in_channels=1, num_classes=10, learn_sigma=False)
            assert (m.input_size, m.in_channels, m.num_classes, m.out_channels) == (16, 1, 10, 1)


def test_state_dict_layout_is_the_official_one():
    """Keys and shapes written out from the official module structure (timm PatchEmbed/Attention/Mlp)."""
    D, p, C, ncls = 32, 2, 4, 10
    expected = {
        "pos_embed": (1, 16, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (ncls + 1, D),
        "final_layer.linear.weight": (p * p * 2 * C, D), "final_layer.linear.bias": (p * p * 2 * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(2):
        expected.update({
            f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D), f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D), f"blocks.{i}.mlp.fc2.bias": (D,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D), f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
        })
    sd = tiny().state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # Without label dropout the official table has no null row.
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape[0] == ncls


def test_init_is_adaln_zero_and_pos_embed_is_fixed_sincos():
    model = tiny()
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0
    assert model.final_layer.linear.weight.abs().sum() == 0
    assert not model.pos_embed.requires_grad
    assert "pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}
    # Closed form (MAE/DiT): token (row i, col j); first half encodes j, second half i,
    # each as [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (D/4)).
    D, gs = 32, 4
    pe = model.pos_embed[0]
    for i, j in [(0, 0), (1, 3), (3, 2)]:
        for k in range(D // 4):
            w = 10000 ** (-k / (D / 4))
            row = pe[i * gs + j]
            assert row[k].item() == pytest.approx(math.sin(j * w), abs=1e-6)
            assert row[D // 4 + k].item() == pytest.approx(math.cos(j * w), abs=1e-6)
            assert row[D // 2 + k].item() == pytest.approx(math.sin(i * w), abs=1e-6)
            assert row[3 * D // 4 + k].item() == pytest.approx(math.cos(i * w), abs=1e-6)
    # Zero-initialised output layer: the fresh model predicts exactly 0.
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10])
    assert model.eval()(x, t, y).abs().max() == 0


def test_forward_shapes_and_label_dropout():
    model = tiny()
    randomize_(model)
    x, t, y = torch.randn(5, 4, 8, 8), torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,))
    model.eval()
    out = model(x, t, y)
    assert out.shape == (5, 8, 8, 8)
    assert torch.equal(out, model(x, t, y))  # eval: no label dropout, deterministic
    # With dropout probability 1 every label becomes the null label in training mode.
    model.y_embedder.dropout_prob = 1.0
    model.train()
    null = model.eval()(x, t, torch.full_like(y, 10))
    assert torch.equal(model.train()(x, t, y), null)  # the same batch, computed the same way
    assert tiny(learn_sigma=False)(x, t, y).shape == (5, 4, 8, 8)


def test_forward_with_cfg_guides_all_channels():
    model = tiny()
    randomize_(model)
    model.eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    y = torch.tensor([3, 7])
    null = torch.full_like(y, 10)
    s = 3.0
    out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), s)
    assert out.shape == (4, 8, 8, 8)
    # Exactly the formula on the one doubled batch it runs, on all 4 prediction channels ...
    cond2, uncond2 = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    want2 = uncond2[:, :4] + s * (cond2[:, :4] - uncond2[:, :4])
    assert torch.equal(out[:2, :4], want2) and torch.equal(out[2:, :4], want2)
    assert torch.equal(out[:2, 4:], cond2[:, 4:]) and torch.equal(out[2:, 4:], uncond2[:, 4:])  # sigma: passed through
    # The shared guidance helper (used by the objectives) computes the same prediction.
    assert torch.equal(guided_forward(model, x, t, y, s)[:, :4], want2)
    # ... and, against separate forwards, equal up to the float error of batching: measured here
    # (a batched and a single matmul may round differently), amplified |1 - s| times in the
    # unconditional and s times in the conditional prediction, plus the formula's own rounding.
    cond, uncond = model(x, t, y), model(x, t, null)
    du, dc = (uncond2 - uncond).abs().max(), (cond2 - cond).abs().max()
    ulp = torch.finfo(torch.float32).eps * max(cond.abs().max(), uncond.abs().max())
    want = uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4])
    assert (out[:2, :4] - want).abs().max() <= abs(1 - s) * du + s * dc + 4 * ulp
    assert (out[:2, 4:] - cond[:, 4:]).abs().max() <= dc


def test_dit_from_config_named_size_and_overrides():
    m = ModelConfig(name="DiT-S/4", input_size=28, in_channels=1, num_classes=10)
    model = dit_from_config(m, learn_sigma=True, step_size_cond=False)
    assert (len(model.blocks), model.hidden_size, model.num_heads, model.patch_size) == (12, 384, 6, 4)
    assert (model.in_channels, model.out_channels, model.num_classes, model.input_size) == (1, 2, 10, 28)
    m = ModelConfig(name="DiT-S/4", input_size=28, hidden_size=64, depth=3, num_heads=4, patch_size=7)
    model = dit_from_config(m, learn_sigma=False, step_size_cond=True)
    assert (len(model.blocks), model.hidden_size, model.num_heads, model.patch_size) == (3, 64, 4, 7)
    assert model.out_channels == 1 and hasattr(model, "d_embedder")
    # build_model: learned sigma only for Gaussian diffusion.
    cfg = Config()
    cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads = 32, 1, 2
    cfg.objective.kind = "flow"
    assert build_model(cfg).out_channels == 1


@pytest.mark.parametrize("overrides, message", [
    (dict(name="DiT-M/2"), "unknown model 'DiT-M/2'"),
    (dict(patch_size=3), "patch_size 3 does not divide input_size 28"),
    (dict(hidden_size=30, num_heads=4), "hidden_size 30 is not divisible by num_heads 4"),
    (dict(conditioning="film"), "unknown conditioning 'film'"),
])
def test_bad_model_config_is_one_line_error(overrides, message):
    m = ModelConfig(**{"hidden_size": 32, "depth": 1, "num_heads": 2, **overrides})
    with pytest.raises(DitlabError, match=message.replace("(", r"\(")) as e:
        dit_from_config(m, learn_sigma=True, step_size_cond=False)
    assert "\n" not in str(e.value)


def _official_models():
    path = os.environ.get("DITLAB_OFFICIAL_DIT")
    if not path:
        pytest.skip("set DITLAB_OFFICIAL_DIT to a facebookresearch/DiT checkout (timm importable)")
    pytest.importorskip("timm")
    spec = importlib.util.spec_from_file_location("official_dit_models", os.path.join(path, "models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("in_channels", [3, 4])
def test_matches_official_code(in_channels):
    official = _official_models()
    kw = dict(input_size=16, patch_size=2, in_channels=in_channels, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    torch.manual_seed(0)
    ref = official.DiT(**kw).eval()
    torch.manual_seed(0)
    ours = DiT(**kw).eval()
    for k, v in ref.state_dict().items():  # same seed -> same init
        assert torch.equal(v, ours.state_dict()[k]), k
    randomize_(ref)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, y = torch.randn(4, in_channels, 16, 16), torch.randint(0, 1000, (4,)), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref(x, t, y), rtol=0, atol=1e-6)
        out, ref_out = ours.forward_with_cfg(x, t, y, 4.0), ref.forward_with_cfg(x, t, y, 4.0)
    torch.testing.assert_close(out[:, :3], ref_out[:, :3], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, in_channels + 3:], ref_out[:, in_channels + 3:], rtol=0, atol=1e-5)
    if in_channels == 4:  # official leaves channel 4 unguided
        assert (out[:, 3] - ref_out[:, 3]).abs().max() > 1e-3


def test_force_drop_ids_replaces_random_label_dropout():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                class_dropout_prob=0.99)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0])
    null = torch.full_like(y, 3)
    model.eval()
    cond, uncond = model(x, t, y), model(x, t, null)
    model.train()  # dropout 0.99 would drop nearly every label; forced ids decide instead
    # The same batch and labels as the eval-mode passes, so the same numbers exactly.
    assert torch.equal(model(x, t, y, force_drop_ids=torch.zeros_like(y)), cond)
    assert torch.equal(model(x, t, y, force_drop_ids=torch.ones_like(y)), uncond)


def _options(**kw) -> dict:
    base = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, num_heads=2, num_classes=10,
                conditioning="adaln_zero", class_encoding="embedding", pos_embed="sincos", norm="layernorm",
                token_layout="2d", token_dim=None)
    return {**base, **kw}


@pytest.mark.parametrize("name, bad", [("input_size", 0), ("patch_size", 0), ("in_channels", 0), ("hidden_size", 0),
                                       ("num_heads", 0), ("num_classes", -1)])
def test_each_size_alone_must_be_positive(name, bad):
    from ditlab.models.dit import _check_options

    _check_options(**_options())  # the base is valid
    with pytest.raises(DitlabError, match="must be >= 1"):
        _check_options(**_options(**{name: bad}))


def test_token_dim_and_head_dim_bounds_are_exact():
    from ditlab.models.dit import _check_options

    _check_options(**_options(token_dim=1))  # a one-channel token is allowed
    with pytest.raises(DitlabError, match=r"token_dim must be >= 1 \(got 0\)"):
        _check_options(**_options(token_dim=0))
    # RoPE on a 2-D grid splits each head into 2 x 2 rotation halves: head dim 24 / 4 = 6 is refused, named as an int.
    with pytest.raises(DitlabError, match=r"hidden_size 24 / num_heads 4 = 6$"):
        _check_options(**_options(hidden_size=24, num_heads=4, pos_embed="rope"))
    # sin-cos needs hidden % 4 (two axes, sin and cos); RoPE does not look at hidden % 4, only at the head dim.
    with pytest.raises(DitlabError, match="sincos needs hidden_size divisible by 4"):
        _check_options(**_options(hidden_size=18, num_heads=2))
    # A 3-D grid rotates 3 axes: head dim 6 works, and hidden 6 (not divisible by 4) is no concern of RoPE's.
    _check_options(**_options(hidden_size=6, num_heads=1, pos_embed="rope", token_layout="3d"))
