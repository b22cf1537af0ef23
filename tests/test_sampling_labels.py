"""`ditlab.sampling.generate` conditions every sample on the label it was asked for.

Checking the labels written beside the images cannot catch a sampler that ignores them. Here the
"model" is the exact denoiser of a data law that is one point per class: class k is the constant
image c_k, so the sample of label k must come out as c_k, whatever the noise, sampler or batch.
For a point mass c the exact predictions are, in each objective's convention
    flow / shortcut (t = 1 noise):  x_t = (1 - t) c + t eps,  velocity (x_t - c) / t
    Gaussian (official schedule):   x_t = sqrt(abar_t) c + sqrt(1 - abar_t) eps,
                                    eps = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t)
and every sampler that uses them moves along the straight path (or, for DDPM, predicts x0 = c at
every step and ends with the posterior mean at t = 0, which is that x0): it ends on c exactly up
to float rounding. The null label's point is c_null, so guidance with scale s ends on
c_null + s (c_k - c_null).

Each c_k is put at the centre of a uint8 level (127.5 c + 128 = level + 0.5, which `to_uint8`
truncates to `level`), so a rounding error below half a level (1/255 in c, orders of magnitude
above float32 rounding here) cannot change the image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ditlab.config import load_config
from ditlab.objectives import build_objective
from ditlab.runs import Run
from ditlab.sampling import generate

NUM_CLASSES = 10
LEVELS = [70 + 10 * k for k in range(NUM_CLASSES)]  # class k is the uint8 image of this grey level
NULL_LEVEL = 128


def centre(level: int) -> float:
    """The pixel value in [-1, 1] at the centre of a uint8 level."""
    return (level + 0.5 - 128.0) / 127.5


def linear_abar(T: int = 1000) -> Tensor:
    """alpha-bar of the official 'linear' schedule (Ho et al.: betas 1e-4..0.02 over 1000 steps)."""
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas))


class PointMasses(nn.Module):
    """The exact prediction of 'class k is the image c_k' for flow, shortcut or Gaussian objectives."""

    in_channels = 1
    input_size = 4
    num_classes = NUM_CLASSES

    def __init__(self, kind: str, learn_sigma: bool = False):
        super().__init__()
        self.kind, self.learn_sigma = kind, learn_sigma
        self.out_channels = 2 if learn_sigma else 1
        self.anchor = nn.Parameter(torch.zeros(()))  # generate() takes the device from the parameters
        table = [centre(level) for level in LEVELS] + [centre(NULL_LEVEL)]  # index num_classes: null label
        self.register_buffer("c", torch.tensor(table, dtype=torch.float64))
        self.register_buffer("abar", linear_abar())
        self.labels_seen: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor, dt: Tensor | None = None, **kw) -> Tensor:
        self.labels_seen.append(y.clone())
        c = self.c[y].view(-1, 1, 1, 1)
        z = x.double()
        if self.kind == "gaussian":  # t: the original timestep index
            a = self.abar[t.long()].view(-1, 1, 1, 1)
            out = (z - a.sqrt() * c) / (1 - a).sqrt()
        else:  # t in 0..1000 model units, t = 1000 is noise
            out = (z - c) / (t.double() / 1000).view(-1, 1, 1, 1)
        if self.learn_sigma:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out.to(x.dtype)


def make_run(kind: str, sampler: str, steps: int, *extra: str) -> Run:
    cfg = load_config(None, [f"objective.kind={kind}", f"sample.sampler={sampler}", f"sample.steps={steps}",
                             "model.learn_sigma=" + ("true" if kind == "gaussian" else "false"),
                             "model.num_classes=10", "model.input_size=4", "model.in_channels=1", *extra])
    return Run(cfg, PointMasses(kind, learn_sigma=kind == "gaussian"), build_objective(cfg))


CASES = [("flow", "euler", 3), ("flow", "heun", 3), ("shortcut", "shortcut", 4), ("gaussian", "ddim", 5),
         ("gaussian", "ddpm", 10)]
LABELS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 0, 8, 7]


@pytest.mark.parametrize("kind,sampler,steps", CASES)
def test_each_sample_is_the_point_of_its_own_label(kind, sampler, steps):
    run = make_run(kind, sampler, steps)
    images, labels = generate(run, LABELS, batch_size=4, seed=1)  # 4 batches, the last one short
    assert labels.tolist() == LABELS
    assert images.shape == (len(LABELS), 4, 4, 1)
    expected = np.array([LEVELS[k] for k in LABELS], dtype=np.uint8)[:, None, None, None]
    assert np.array_equal(images, np.broadcast_to(expected, images.shape)), images[:, 0, 0, 0].tolist()
    # Every model call saw the requested labels of its batch.
    seen = torch.cat([y for y in run.model.labels_seen if len(y)])
    assert set(seen.tolist()) == set(LABELS)


@pytest.mark.parametrize("kind,sampler,steps", CASES[::2])
def test_guided_samples_extrapolate_from_the_null_point(kind, sampler, steps):
    scale = 2.0
    run = make_run(kind, sampler, steps, "model.class_dropout_prob=0.1", f"sample.cfg_scale={scale}")
    images, _ = generate(run, LABELS, batch_size=5, seed=2)
    # 127.5 (c_null + s (c_k - c_null)) + 128 = 128.5 + s (level_k - 128): again a level centre.
    expected = [int(NULL_LEVEL + 0.5 + scale * (LEVELS[k] - NULL_LEVEL)) for k in LABELS]
    assert images[:, 0, 0, 0].tolist() == expected
    assert np.array_equal(images, np.broadcast_to(images[:, :1, :1, :], images.shape))
