"""The data order's micro-batch sampler against a naive reference: the global batch of step s is
stream positions [s B, (s + 1) B) of the concatenated per-epoch permutations, cut into micro-batches."""

from __future__ import annotations

import torch

from ditlab.train.order import MicroBatches, StepSampler


def test_micro_batches_resume_mid_run_and_count_themselves():
    order = StepSampler(num_samples=10, global_batch=6, seed=1)
    stream = torch.cat([order.permutation(e) for e in range(4)]).tolist()  # the naive stream
    for start, end, micro in ((0, 5, [0, 1, 2]), (2, 5, [1]), (3, 3, [0, 2])):
        batches = list(MicroBatches(order, start, end, micro, per_micro=2))
        assert len(MicroBatches(order, start, end, micro, per_micro=2)) == len(batches) == (end - start) * len(micro)
        expected = [stream[s * 6 + m * 2: s * 6 + m * 2 + 2] for s in range(start, end) for m in micro]
        assert batches == expected


def test_mix_seed_gives_distinct_63_bit_seeds():
    # Per-step and per-micro-batch RNGs are seeded by mix_seed(seed, step, m): distinct inputs must
    # not share a seed (that would correlate the noise of two steps), and all 63 bits are in use.
    from ditlab.train.order import mix_seed

    seeds = [mix_seed(s, step, m) for s in range(3) for step in range(300) for m in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= x < 2**63 for x in seeds) and max(seeds) > 2**62
    assert mix_seed(7, 1, 0) == mix_seed(7, 1, 0) != mix_seed(7, 0, 1)
