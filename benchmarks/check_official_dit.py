"""Side-by-side check of ditlab's DiT against the official facebookresearch/DiT models.py.

    PYTHONPATH=/work/peer/timm_pkg:/work/peer/stubs python benchmarks/check_official_dit.py /work/peer/DiT

(or set DITLAB_OFFICIAL_DIT instead of the path argument). The official code needs timm on the
path; ditlab does not. For each config it builds both models from the same seed and reports:
identical state_dict keys/shapes, identical seeded initialisation, max |difference| of
`forward` after copying weights official -> ditlab and ditlab -> official, and of
`forward_with_cfg` (equal at in_channels=3; at 4 channels ditlab also guides channel 4, which
the official code leaves unguided, so the difference shows up there only).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch


def load_official(path: str):
    spec = importlib.util.spec_from_file_location("official_dit_models", os.path.join(path, "models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values (the zero-initialised adaLN/output layers too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def compare(official, name: str | None, kwargs: dict, batch: int = 4) -> list[tuple[str, str]]:
    from ditlab.models.dit import DiT, DiT_models

    def build(ctor_table, cls, seed):
        torch.manual_seed(seed)
        return (ctor_table[name](**kwargs) if name else cls(**kwargs)).eval()

    rows = []
    o = build(official.DiT_models, official.DiT, 0)
    d = build(DiT_models, DiT, 0)
    so, sd = o.state_dict(), d.state_dict()
    same_keys = list(so) == list(sd) and all(so[k].shape == sd[k].shape for k in so)
    rows.append(("state_dict keys/shapes identical", str(same_keys)))
    init_diff = max((so[k] - sd[k]).abs().max().item() for k in so) if same_keys else float("nan")
    rows.append(("seeded init max|diff|", f"{init_diff:.2e}"))
    rows.append(("parameters (official / ditlab)", f"{sum(p.numel() for p in o.parameters()):,} / {sum(p.numel() for p in d.parameters()):,}"))

    C, S = kwargs.get("in_channels", 4), kwargs.get("input_size", 32)
    ncls = kwargs.get("num_classes", 1000)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, C, S, S, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, ncls, (batch,), generator=g)
    with torch.no_grad():
        randomize(o, 2)
        d.load_state_dict(o.state_dict(), strict=True)
        rows.append(("forward max|diff| (official -> ditlab)", f"{(o(x, t, y) - d(x, t, y)).abs().max().item():.2e}"))
        randomize(d, 3)
        o.load_state_dict(d.state_dict(), strict=True)
        rows.append(("forward max|diff| (ditlab -> official)", f"{(o(x, t, y) - d(x, t, y)).abs().max().item():.2e}"))
        y_cfg = torch.cat([y[: batch // 2], torch.full((batch // 2,), ncls)])
        out_o, out_d = o.forward_with_cfg(x, t, y_cfg, 4.0), d.forward_with_cfg(x, t, y_cfg, 4.0)
        diff = (out_o - out_d).abs().amax(dim=(0, 2, 3))
        rows.append((f"forward_with_cfg max|diff| per channel (C={C})", " ".join(f"{v:.1e}" for v in diff.tolist())))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official", nargs="?", default=os.environ.get("DITLAB_OFFICIAL_DIT"),
                        help="path to a facebookresearch/DiT checkout (default: $DITLAB_OFFICIAL_DIT)")
    parser.add_argument("--large", action="store_true", help="also check DiT-XL/2 at 32x32x4 (slow, ~6 GB RAM)")
    args = parser.parse_args()
    if not args.official:
        print("error: give the path of an official DiT checkout (or set DITLAB_OFFICIAL_DIT)", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    official = load_official(args.official)
    configs = [
        ("tiny C=4", None, dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)),
        ("tiny C=3", None, dict(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=2, num_heads=4, num_classes=10)),
        ("tiny C=1 learned sigma", None, dict(input_size=28, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)),
        ("tiny C=1 no-sigma", None, dict(input_size=28, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False)),
        ("DiT-S/4 32x32x4", "DiT-S/4", dict(input_size=32, in_channels=4, num_classes=1000)),
        ("DiT-S/2 32x32x3", "DiT-S/2", dict(input_size=32, in_channels=3, num_classes=1000)),
    ]
    if args.large:
        configs.append(("DiT-XL/2 32x32x4", "DiT-XL/2", dict(input_size=32, in_channels=4, num_classes=1000)))
    for label, name, kwargs in configs:
        rows = compare(official, name, kwargs, batch=2 if name == "DiT-XL/2" else 4)
        print(f"\n## {label}")
        width = max(len(r[0]) for r in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
