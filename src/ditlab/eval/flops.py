"""Gflops per forward pass and parameter counts (the DiT paper's convention: MACs of one image).

The counter lives in `ditlab.models.flops` (train/ counts training compute with it and may not
import eval/); this module re-exports it for `ditlab flops` and the metrics libraries.
"""

from __future__ import annotations

from ditlab.models.flops import (
    FORMULAS,
    _sdpa_flops,
    build_for_counting,
    count_flops,
    count_params,
    gflops,
    measure,
    model_inputs,
)

__all__ = ["FORMULAS", "_sdpa_flops", "build_for_counting", "count_flops", "count_params", "gflops",
           "measure", "model_inputs"]
