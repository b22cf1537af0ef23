"""The rules of classifier-free guidance (objectives/guidance.py): which models can be guided, the
guidance interval's bounds, and how keyword inputs reach the doubled batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ditlab.config import load_config
from ditlab.errors import DitlabError
from ditlab.models import build_model
from ditlab.objectives.guidance import check_guidance, check_interval, guided_forward, scale_at


class TableModel(nn.Module):
    """An official-style conditional model: a label table, with or without the null row, and no
    `has_null` to say which (the table's size has to tell)."""

    def __init__(self, num_classes: int, rows: int):
        super().__init__()
        self.num_classes, self.in_channels = num_classes, 1
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(rows, 2)


def test_models_without_classes_cannot_be_guided():
    for model in (nn.Linear(1, 1), TableModel(0, 1)):  # no num_classes at all; num_classes = 0
        with pytest.raises(DitlabError, match=r"cfg_scale=2\.0 needs a class-conditional model"):
            check_guidance(model, 2.0)
        check_guidance(model, 1.0)  # no guidance asked: fine


def test_a_label_table_needs_its_null_row():
    check_guidance(TableModel(10, 11), 4.0)
    with pytest.raises(DitlabError, match=r"cfg_scale=4\.0 needs a null label"):
        check_guidance(TableModel(10, 10), 4.0)


@pytest.mark.parametrize("encoding", ["embedding", "onehot"])
def test_ditlab_encoders_say_whether_the_null_input_was_trained(encoding):
    def model(dropout: float):
        return build_model(load_config(None, ["model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1",
                                              "model.num_heads=2", f"model.class_encoding={encoding}",
                                              f"model.class_dropout_prob={dropout}"]))

    check_guidance(model(0.1), 3.0)
    with pytest.raises(DitlabError, match="null label"):  # onehot has no table: only has_null tells
        check_guidance(model(0.0), 3.0)
    with pytest.raises(DitlabError, match=r"cfg_scale=3\.0 needs a null label"):  # through the guided call too
        guided_forward(model(0.0), torch.zeros(1, 1, 28, 28), torch.zeros(1), torch.zeros(1, dtype=torch.long), 3.0)


def test_guidance_interval_bounds():
    assert check_interval(None) is None
    for ok in ([0.0, 1.0], [0.5, 0.5], (0.2, 0.7)):  # inclusive bounds; a single time is an interval too
        assert check_interval(ok) == (float(ok[0]), float(ok[1]))
    for bad in ([0.8, 0.2], [0.2, 1.5], [-0.1, 0.5], [0.1, 0.5, 0.9], [0.3]):
        with pytest.raises(DitlabError, match="guidance_interval"):
            check_interval(bad)
    # Guided exactly on the bounds (t in [lo, hi]), unguided outside.
    for t, scale in ((0.2, 3.0), (0.7, 3.0), (0.45, 3.0), (0.19, 1.0), (0.71, 1.0)):
        assert scale_at(3.0, t, (0.2, 0.7)) == scale
    assert scale_at(3.0, 0.0, None) == 3.0


def test_keyword_tensors_are_doubled_and_other_keywords_passed_as_they_are():
    class StepModel(nn.Module):
        num_classes, in_channels = 3, 1

        def forward(self, x, t, y, dt=None, note=None):
            self.note = note
            return x * dt.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)  # needs one dt per row of the doubled batch

    model = StepModel()
    x, y, dt = torch.ones(2, 1, 1, 1), torch.tensor([0, 2]), torch.tensor([0.5, 0.25])
    out = guided_forward(model, x, torch.zeros(2), y, 2.0, dt=dt, note="as is")
    # cond = dt + y, uncond = dt + 3 (the null label): uncond + 2 (cond - uncond) = dt + 2 y - 3
    assert out.flatten().tolist() == [0.5 + 0 - 3, 0.25 + 4 - 3]
    assert model.note == "as is"
