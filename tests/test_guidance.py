"""Classifier-free guidance shared by every objective: formula, channels, and refusals."""

import pytest
import torch

from ditlab.objectives.guidance import guided_forward
from ditlab.errors import DitlabError
from ditlab.models import DiT


def tiny(**kw):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=3, **kw)
    for p in model.parameters():  # leave the zero init so the output depends on inputs
        p.data.normal_(0, 0.2)
    return model.eval()


def test_guidance_formula_on_prediction_channels_only():
    model = tiny()
    s = 3.0
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    null = torch.full_like(y, 3)
    out = guided_forward(model, x, t, y, s)
    # Exactly the formula on the one doubled batch the guided call runs ...
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    assert torch.equal(out[:, :2], uncond[:, :2] + s * (cond[:, :2] - uncond[:, :2]))
    assert torch.equal(out[:, 2:], cond[:, 2:])  # learned sigma from the conditional pass
    # ... and, against two separate forwards, equal up to the float error of batching: a batched
    # and a single matmul may round differently (measured here, not assumed), and the guided
    # output (1 - s) u + s c carries |1 - s| times the error of u plus s times that of c.
    cond1, uncond1 = model(x, t, y), model(x, t, null)
    du, dc = (uncond - uncond1).abs().max(), (cond - cond1).abs().max()
    ulp = torch.finfo(torch.float32).eps * max(cond1.abs().max(), uncond1.abs().max())
    bound = abs(1 - s) * du + s * dc + 4 * ulp  # + the rounding of the formula itself
    assert (out[:, :2] - (uncond1[:, :2] + s * (cond1[:, :2] - uncond1[:, :2]))).abs().max() <= bound
    assert torch.equal(guided_forward(model, x, t, y, 1.0), model(x, t, y))


def test_guidance_refuses_models_without_null_label():
    with pytest.raises(DitlabError, match="null label"):
        guided_forward(tiny(class_dropout_prob=0.0), torch.randn(1, 2, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), 2.0)
    uncond = DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(DitlabError, match="class-conditional"):
        guided_forward(uncond, torch.randn(1, 2, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), 2.0)
