"""Classifier-free guidance shared by every objective: formula, channels, and refusals."""

import pytest
import torch

from ditlab.diffusion.guidance import guided_forward
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
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    out = guided_forward(model, x, t, y, 3.0)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))
    assert torch.allclose(out[:, :2], uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]), atol=1e-5)
    assert torch.allclose(out[:, 2:], cond[:, 2:], atol=1e-6)  # learned sigma from the conditional pass
    assert torch.equal(guided_forward(model, x, t, y, 1.0), model(x, t, y))


def test_guidance_refuses_models_without_null_label():
    with pytest.raises(DitlabError, match="null label"):
        guided_forward(tiny(class_dropout_prob=0.0), torch.randn(1, 2, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), 2.0)
    uncond = DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(DitlabError, match="class-conditional"):
        guided_forward(uncond, torch.randn(1, 2, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), 2.0)
