"""Gflops per forward pass and parameter counts, in the DiT paper's convention.

The DiT paper's "Gflops" (Table 4: DiT-XL/2 118.6, DiT-S/2 6.06 at 256x256, i.e. 32x32x4
latents) are multiply-accumulates (MACs) of one forward pass of one image, attention included.
torch.utils.flop_counter counts 2 FLOPs per MAC for matmuls/linears/convs, and counts nothing
for the CPU fused attention kernel, so we count attention ourselves (QK^T and AV: two batched
matmuls of B*heads*N*M*d MACs each) and report counted FLOPs / 2.

Models are built and run on the meta device (shapes only, no memory, no arithmetic), so
DiT-XL/2 is as cheap to count as DiT-S/8; models that cannot run on meta fall back to CPU.

The counter lives in `ditlab.models.flops` (train/ counts training compute with it and may not
import eval/); this module re-exports it for `ditlab flops` and the metrics libraries.
"""

from __future__ import annotations

from ditlab.models.flops import (
    ATTENTION_FORMULAS,
    _sdpa_flops,
    build_for_counting,
    count_flops,
    count_params,
    gflops,
    measure,
    model_inputs,
)

__all__ = ["ATTENTION_FORMULAS", "_sdpa_flops", "build_for_counting", "count_flops", "count_params", "gflops",
           "measure", "model_inputs"]
