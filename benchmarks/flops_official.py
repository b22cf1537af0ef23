"""Side-by-side check: Gflops/params of the official DiT models.py vs ditlab's, same counter.

    PYTHONPATH=/work/peer/DiT:/work/peer/timm_pkg:/work/peer/stubs python benchmarks/flops_official.py

Both are counted on the meta device at 256x256 (32x32x4 latents, 1000 classes), one image.
"""

from __future__ import annotations

import torch

from ditlab.config import load_config
from ditlab.eval.flops import count_params, gflops, measure


def main() -> None:
    from models import DiT_models as official  # the official repository's models.py

    print(f"{'model':<10} {'official Gflops':>16} {'ditlab Gflops':>14} {'official params':>16} {'ditlab params':>14}")
    for name in official:
        with torch.device("meta"):
            model = official[name](input_size=32, num_classes=1000).eval()
        model.input_size = 32  # the attributes count_flops reads
        ours = measure(load_config(None, ["model.input_size=32", "model.in_channels=4", "model.num_classes=1000",
                                          f"model.name={name}"]))
        print(f"{name:<10} {gflops(model):>16.3f} {ours['gflops']:>14.3f} {count_params(model):>16,} {ours['params']:>14,}")


if __name__ == "__main__":
    main()
