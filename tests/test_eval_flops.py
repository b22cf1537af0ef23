"""Gflops in the DiT paper's convention: the 12 values of its Table 4 (256x256, 32x32x4 latents)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditlab.cli import main
from ditlab.config import load_config

from ditlab.eval.flops import count_flops, measure
from ditlab.models import build_model
from ditlab.models.onednn import onednn_available

# Peebles & Xie 2023, Table 4 (Gflops of one forward pass at 256x256).
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
IMAGENET_256 = ["model.input_size=32", "model.in_channels=4", "model.num_classes=1000"]
MNIST = ["model.input_size=28", "model.in_channels=1", "model.num_classes=10"]


@pytest.mark.parametrize("name", list(PAPER_GFLOPS))
def test_paper_table_gflops(name):
    r = measure(load_config(None, IMAGENET_256 + [f"model.name={name}"]))
    assert r["gflops"] == pytest.approx(PAPER_GFLOPS[name], rel=0.01)
    if name == "DiT-XL/2":
        assert r["params"] == pytest.approx(675e6, rel=0.001)  # the paper's 675M


def test_attention_counted_analytically():
    from ditlab.models.dit import DiT

    def tiny():
        return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)

    model = tiny().eval()
    x, t = torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        model(x, t, t)  # torch counts nothing for the CPU fused attention kernel
    # QK^T and AV per layer: 2 matmuls x heads * N^2 * d_head MACs = 2 * N^2 * hidden, 2 FLOPs/MAC.
    n_tokens, depth, hidden = 16, 2, 64
    expected_attention = 2 * (2 * depth * n_tokens**2 * hidden)
    assert count_flops(model) - plain.get_total_flops() == expected_attention
    with torch.device("meta"):  # on meta, SDPA decomposes into bmm's that torch counts: same total
        meta_model = tiny().eval()
    assert count_flops(meta_model) == count_flops(model)


def test_fused_cpu_kernels_count_as_their_meta_decomposition():
    """On the CPU the model runs oneDNN's linear and the fused attention kernel, which torch's counter
    does not know (`FORMULAS`); on meta the same model runs aten's mm and bmm's, which it does. Both
    must count the same FLOPs, with a batch of 3, 49 tokens against 64-dim heads, and cross-attention
    (keys from the conditioning tokens, not from the 49 image tokens)."""
    base = MNIST + ["model.name=DiT-S/4"]
    for extra in ([], ["model.conditioning=cross_attn"]):
        cfg = load_config(None, base + extra)
        cpu = build_model(cfg).eval()
        assert any(type(m).__name__ == "OneDNNLinear" for m in cpu.modules()) == onednn_available()
        with torch.device("meta"):
            meta = build_model(cfg).eval()
        assert count_flops(cpu, batch=3) == count_flops(meta, batch=3)


def test_step_size_embedder_counted_for_shortcut_models():
    """A shortcut model is called with dt= and pays for its step-size embedder: the plain model's count
    plus that embedder's linears (in x out MACs each, one image)."""
    base = MNIST + ["model.name=DiT-S/4"]
    plain = measure(load_config(None, base + ["objective.kind=flow"]))  # no learned sigma either
    shortcut_cfg = load_config(None, base + ["objective.kind=shortcut"])
    shortcut = measure(shortcut_cfg)
    embedder = build_model(shortcut_cfg).d_embedder
    macs = sum(m.in_features * m.out_features for m in embedder.modules() if isinstance(m, torch.nn.Linear))
    assert macs > 0
    assert shortcut["gflops"] * 1e9 == pytest.approx(plain["gflops"] * 1e9 + macs, abs=0.5)  # integers
    assert shortcut["params"] == plain["params"] + sum(p.numel() for p in embedder.parameters())
    with torch.device("meta"):  # dt made where the model lives (a CPU dt beside meta weights fails)
        on_meta = build_model(shortcut_cfg).eval()
    assert count_flops(on_meta) / 2 == shortcut["gflops"] * 1e9


class NeedsValues(torch.nn.Module):
    """A model whose forward reads a value (`.item()`), which the meta device does not have."""
    input_size, in_channels = 4, 1

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 3)

    def forward(self, x, t, y):
        if x.sum().item() > 0:
            x = -x
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("fails", ["nothing", "construction", "forward"])
def test_models_are_counted_on_meta_and_on_the_cpu_where_meta_fails(monkeypatch, fails):
    """Counting builds the model once, on meta (no memory: DiT-XL/2 costs nothing). A model that cannot
    be built there, or whose forward cannot run there, is built again and counted on the CPU."""
    import ditlab.models.flops as flops

    cfg = load_config(None, MNIST + ["model.name=DiT-S/4"])
    expected = flops.measure(cfg)
    built = []

    def build(c):
        assert c is cfg
        device = torch.get_default_device().type
        built.append(device)
        if fails == "nothing":
            return build_model(c)
        if fails == "construction" and device == "meta":
            raise RuntimeError("cannot build on meta")
        return NeedsValues()

    monkeypatch.setattr(flops, "build_model", build)
    if fails == "nothing":
        assert next(flops.build_for_counting(cfg).parameters()).device.type == "meta"
        built.clear()
        assert flops.measure(cfg) == expected
        assert built == ["meta"]
        return
    r = flops.measure(cfg)
    assert r["gflops"] == 16 * 3 / 1e9 and r["params"] == 16 * 3 + 3
    assert built == ["meta", "cpu"]
    with torch.device("meta"):
        with pytest.raises(RuntimeError, match="meta"):
            flops.count_flops(NeedsValues())


def hand_count_macs(model) -> int:
    """MACs of one forward pass counted by hand: every conv and linear from its output size and
    fan-in, and each U-Net attention as QK^T plus AV, 2 (HW)^2 C multiply-accumulates."""
    from torch import nn
    from ditlab.eval.flops import model_inputs
    from ditlab.models.unet import AttentionBlock

    macs = [0]

    def conv(m, i, o):
        macs[0] += o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, i, o):
        macs[0] += o.numel() * m.in_features

    def attention(m, i, o):
        b, c, h, w = i[0].shape
        macs[0] += 2 * b * (h * w) ** 2 * c

    for m in model.modules():
        hook = next((h for kind, h in ((nn.Conv2d, conv), (nn.Linear, linear), (AttentionBlock, attention))
                     if isinstance(m, kind)), None)
        if hook:
            m.register_forward_hook(hook)
    args, kwargs = model_inputs(model)
    with torch.no_grad():
        model(*args, **kwargs)
    return macs[0]


def test_unet_and_variants_count():
    cfg = load_config(None, MNIST + ["model.name=unet"])
    unet = measure(cfg)
    model = build_model(cfg).eval()  # on the CPU, counted by hand
    assert unet["params"] == sum(p.numel() for p in model.parameters())
    assert unet["gflops"] == pytest.approx(hand_count_macs(model) / 1e9, rel=1e-12)  # integers, exactly
    plain = measure(load_config(None, MNIST + ["model.name=DiT-S/4"]))
    cross = measure(load_config(None, MNIST + ["model.name=DiT-S/4", "model.conditioning=cross_attn"]))
    assert cross["gflops"] > plain["gflops"]  # an extra attention per block


def test_flops_cli(capsys, tmp_path):
    out = tmp_path / "f.json"
    assert main(["flops", "DiT-S/2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DiT-S/2" in text and "6.06" in text
    assert out.exists()
    assert main(["flops", "DiT-Q/2"]) == 2
    assert "unknown model" in capsys.readouterr().err
