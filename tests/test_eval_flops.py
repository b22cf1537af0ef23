"""Gflops in the DiT paper's convention: the 12 values of its Table 4 (256x256, 32x32x4 latents)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditlab.cli import main
from ditlab.config import load_config

pytest.importorskip("ditlab.models.dit")

from ditlab.eval.flops import count_flops, measure  # noqa: E402

# Peebles & Xie 2023, Table 4 (Gflops of one forward pass at 256x256).
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
IMAGENET_256 = ["model.input_size=32", "model.in_channels=4", "model.num_classes=1000"]


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
    from ditlab.models import build_model

    base = ["model.input_size=28", "model.in_channels=1", "model.num_classes=10"]
    cfg = load_config(None, base + ["model.name=unet"])
    unet = measure(cfg)
    model = build_model(cfg).eval()  # on the CPU, counted by hand
    assert unet["params"] == sum(p.numel() for p in model.parameters())
    assert unet["gflops"] == pytest.approx(hand_count_macs(model) / 1e9, rel=1e-12)  # integers, exactly
    plain = measure(load_config(None, base + ["model.name=DiT-S/4"]))
    cross = measure(load_config(None, base + ["model.name=DiT-S/4", "model.conditioning=cross_attn"]))
    assert cross["gflops"] > plain["gflops"]  # an extra attention per block


def test_flops_cli(capsys, tmp_path):
    out = tmp_path / "f.json"
    assert main(["flops", "DiT-S/2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "DiT-S/2" in text and "6.06" in text
    assert out.exists()
    assert main(["flops", "DiT-Q/2"]) == 2
    assert "unknown model" in capsys.readouterr().err
