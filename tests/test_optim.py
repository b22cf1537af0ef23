"""`optim.name=muon`: which parameters Muon takes, its update against the closed form through the SVD,
AdamW's first step on the rest, and exact resume."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditlab.cli import main
from ditlab.config import load_config
from ditlab.models import build_model
from ditlab.train.optim import MuonAdamW

TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=4",
    "objective.kind=flow", "optim.name=muon", "optim.batch_size=8", "optim.lr=1e-3", "optim.warmup_steps=2",
    "train.ema_decay=0.99", "train.tensorboard=false", "train.progress=false", "train.log_every=1",
    "sample.sampler=euler", "sample.steps=2", "sample.num_samples=10",
]
# The DiT's hidden matrices, named independently of the code under test.
HIDDEN = re.compile(r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1)\.weight")


def _split(opt: MuonAdamW) -> tuple[set[int], set[int]]:
    return ({id(p) for g in opt.muon.param_groups for p in g["params"]},
            {id(p) for g in opt.adamw.param_groups for p in g["params"]})


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    cfg = load_config(None, TINY)
    model = build_model(cfg)
    muon, adamw = _split(MuonAdamW(model, cfg.optim, fused=None))
    named = dict(model.named_parameters())
    assert muon == {id(p) for n, p in named.items() if HIDDEN.fullmatch(n)} and len(muon) == 2 * 5
    assert adamw == {id(p) for n, p in named.items() if not HIDDEN.fullmatch(n)}  # embedders, biases, output layer
    assert "final_layer.linear.weight" in named and id(named["final_layer.linear.weight"]) in adamw


def test_a_model_without_transformer_blocks_is_refused_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    unet = ["model.name=unet", "model.unet_channels=16", "model.unet_num_res_blocks=1", "optim.name=muon",
            "optim.batch_size=4", "train.steps=1", "train.progress=false", f"train.out_dir={run}"]
    assert main(["train", *unet]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: optim.name=muon needs a transformer with blocks (UNet has none); use optim.name=adamw"
    assert not (run / "checkpoints").exists()


def _nesterov_polar(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Closed form of Muon's first update direction: the momentum is a multiple of g, and the
    Newton-Schulz quintic p(x) = 3.4445 x - 4.7750 x^3 + 2.0315 x^5 (Jordan et al.) acts on the
    singular values of g / ||g||_F, keeping the singular vectors."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    x = s / s.norm()
    for _ in range(steps):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    return u @ torch.diag(x) @ vh


def test_first_step_follows_the_closed_forms():
    cfg = load_config(None, [*TINY, "optim.lr=0.01", "optim.betas=[0.5,0.9]"])
    model = build_model(cfg)
    opt = MuonAdamW(model, cfg.optim, fused=None)
    muon, _ = _split(opt)
    gen = torch.Generator().manual_seed(0)
    before = {}
    for n, p in model.named_parameters():  # |g| >= 0.5: AdamW's eps (1e-8) is negligible against it
        sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
        p.grad = sign * (0.5 + torch.rand(p.shape, generator=gen))
        before[n] = p.detach().clone()
    opt.step()
    lr = 0.01
    for n, p in model.named_parameters():
        delta = (p.detach() - before[n]).double()
        if id(p) in muon:
            # lr x 0.2 sqrt(max(rows, cols)) (AdamW's RMS) x the polar-like factor. Torch iterates in bf16
            # (unit roundoff 2^-8); five iterations of three rounded products each bound the error by
            # about 15 x 2^-8 of the largest entry.
            expected = -lr * 0.2 * math.sqrt(max(p.shape)) * _nesterov_polar(p.grad)
            assert (delta - expected).abs().max() <= 15 * 2**-8 * expected.abs().max(), n
            adam_like = -lr * p.grad.sign().double()
            assert (delta - adam_like).abs().max() > 0.5 * lr, n  # not a sign step: Muon did move it
        else:
            # AdamW's first step (bias-corrected m / sqrt(v) = g / |g|): -lr sign(g), to float rounding
            torch.testing.assert_close(delta, -lr * p.grad.sign().double(), rtol=0, atol=lr * 1e-5)
    # AdamW's second step with the configured betas (0.5, 0.9), in closed form from both gradients
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    mid = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = torch.rand(p.shape, generator=gen) - 0.5
    opt.step()
    b1, b2 = 0.5, 0.9
    for n, p in model.named_parameters():
        if id(p) not in muon:
            g1, g2 = first[n].double(), p.grad.double()
            m = (b1 * (1 - b1) * g1 + (1 - b1) * g2) / (1 - b1**2)
            v = (b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2) / (1 - b2**2)
            expected = -lr * m / (v.sqrt() + 1e-8)
            torch.testing.assert_close((p.detach() - mid[n]).double(), expected, rtol=0, atol=lr * 1e-5)


def test_resume_with_muon_is_bit_identical(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    args = [*TINY, "train.ckpt_every=3"]
    assert main(["train", *args, f"train.out_dir={full}", "train.steps=6"]) == 0
    assert main(["train", *args, f"train.out_dir={half}", "train.steps=3"]) == 0
    assert main(["train", *args, f"train.out_dir={half}", "train.steps=6", "--resume"]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(run / "checkpoints" / "step_0000006" / name) for run in (full, half))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    states = [torch.load(Path(run) / "checkpoints" / "step_0000006" / "state.pt", weights_only=True)["optimizer"]
              for run in (full, half)]
    for part in ("adamw", "muon"):
        a, b = (s[part]["state"] for s in states)
        assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    assert len(states[0]["muon"]["state"]) == 2 * 5  # a momentum buffer per hidden matrix
    mid = load_file(half / "checkpoints" / "step_0000003" / "model.safetensors")
    end = load_file(half / "checkpoints" / "step_0000006" / "model.safetensors")
    assert not torch.equal(mid["blocks.0.attn.qkv.weight"], end["blocks.0.attn.qkv.weight"])


def test_an_adamw_state_does_not_load_into_muon():
    cfg = load_config(None, TINY)
    model = build_model(cfg)
    adamw_state = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(KeyError, match="saved by another optimizer than optim.name=muon"):
        MuonAdamW(model, cfg.optim, fused=None).load_state_dict(adamw_state)
