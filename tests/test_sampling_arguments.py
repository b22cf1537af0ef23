"""How `ditlab.sampling.generate` resolves its arguments: each left as None takes the run's `sample`
section, a sampler or step count unset there takes the objective's default, explicit values win,
and the noise comes from the seed. A recording objective shows what `generate` passes down."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ditlab.config import load_config
from ditlab.errors import DitlabError
from ditlab.objectives.base import Objective
from ditlab.runs import Run
from ditlab.sampling import generate


class Recording(Objective):
    name = "recording"
    samplers = ("euler", "ddim")
    default_steps = 7

    def __init__(self):
        self.calls: list[dict] = []

    def sample(self, model, noise, y, **kw):
        self.calls.append({"noise": noise.clone(), "y": y.clone(), **kw})
        return noise.clamp(-1, 1)


class Model(nn.Module):
    in_channels, input_size = 1, 2

    def __init__(self, num_classes: int | None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        if num_classes is not None:
            self.num_classes = num_classes


def run_of(num_classes: int | None = 3, *overrides: str, codec=None) -> Run:
    cfg = load_config(None, ["sample.seed=5", "sample.batch_size=4", "sample.cfg_scale=2.5", *overrides])
    return Run(cfg, Model(num_classes), Recording(), codec)


def call(run: Run, labels=(0, 1, 2), **kw) -> dict:
    run.objective.calls.clear()
    generate(run, list(labels), **kw)
    return run.objective.calls[0]


def test_defaults_come_from_the_config_then_the_objective():
    c = call(run_of())
    assert (c["sampler"], c["steps"], c["cfg_scale"]) == ("euler", 7, 2.5)  # objective default, config scale
    assert c["clip_denoised"] is True and c["progress"] is False and "eta" not in c
    c = call(run_of(3, "sample.sampler=ddim", "sample.steps=4", "sample.eta=0.3", "sample.clip_denoised=false"))
    assert (c["sampler"], c["steps"], c["eta"], c["clip_denoised"]) == ("ddim", 4, 0.3, False)


def test_explicit_arguments_win():
    run = run_of(3, "sample.sampler=ddim", "sample.steps=4", "sample.eta=0.3")
    c = call(run, sampler="euler", steps=9, cfg_scale=1.5, clip_denoised=False, guidance_interval=[0.1, 0.2])
    assert (c["sampler"], c["steps"], c["cfg_scale"], c["clip_denoised"]) == ("euler", 9, 1.5, False)
    assert c["guidance_interval"] == [0.1, 0.2] and "eta" not in c
    assert call(run, eta=0.7)["eta"] == 0.7
    with pytest.raises(DitlabError, match="eta applies to the ddim sampler only"):
        generate(run, [0], sampler="euler", eta=1.0)
    assert call(run, sampler="euler", eta=0.0)["sampler"] == "euler"  # eta 0 = none: accepted anywhere


def test_latents_are_not_clipped_unless_asked():
    class Codec:
        def decode(self, z):
            return z

    assert call(run_of(3, codec=Codec()))["clip_denoised"] is False
    assert call(run_of(3, codec=Codec()), clip_denoised=True)["clip_denoised"] is True


def test_noise_comes_from_the_seed_batch_by_batch():
    run = run_of()
    generate(run, [0, 1, 2, 0, 1, 2])  # batch size 4: two calls
    first, second = run.objective.calls[-2:]
    g = torch.Generator().manual_seed(5)  # the config's seed
    assert torch.equal(first["noise"], torch.randn((4, 1, 2, 2), generator=g))
    assert torch.equal(second["noise"], torch.randn((2, 1, 2, 2), generator=g))
    assert first["generator"] is second["generator"]  # one generator for the prior and every step
    assert first["y"].tolist() == [0, 1, 2, 0] and second["y"].tolist() == [1, 2]
    g = torch.Generator().manual_seed(11)
    assert torch.equal(call(run, seed=11)["noise"], torch.randn((3, 1, 2, 2), generator=g))


def test_unconditional_and_single_class_models():
    # No classes (num_classes 0, or no such attribute): labels are -1 and the config's scale is ignored.
    for num_classes in (0, None):
        run = run_of(num_classes)
        images, labels = generate(run, [4, 7])
        assert labels.tolist() == [-1, -1] and run.objective.calls[0]["cfg_scale"] == 1.0
        assert run.objective.calls[0]["y"].tolist() == [0, 0]
    # One class is still a conditional model: its label is kept and checked.
    run = run_of(1)
    assert generate(run, [0, 0])[1].tolist() == [0, 0] and run.objective.calls[0]["cfg_scale"] == 2.5
    with pytest.raises(DitlabError, match=r"labels must be in \[0, 0\]"):
        generate(run, [1])
    assert np.array_equal(generate(run_of(), [])[1], np.zeros(0, np.int64))


def test_batches_labels_and_progress(capsys):
    run = run_of()
    generate(run, [0, 1, 2, 0, 1, 2], batch_size=2)
    assert [len(c["y"]) for c in run.objective.calls] == [2, 2, 2]  # the explicit batch size wins
    run.objective.calls.clear()
    generate(run, [0, 1, 2], batch_size=1)
    assert [len(c["y"]) for c in run.objective.calls] == [1, 1, 1]
    with pytest.raises(DitlabError, match="batch size must be positive"):
        generate(run, [0], batch_size=0)
    # Labels: any integer array, any shape, come back as int64 [N].
    images, labels = generate(run, np.array([[0, 1], [2, 0]], dtype=np.int32))
    assert labels.dtype == np.int64 and labels.tolist() == [0, 1, 2, 0] and images.shape == (4, 2, 2, 1)
    images, labels = generate(run, [])
    assert len(images) == 0 and images.dtype == np.uint8 and labels.dtype == np.int64
    # A progress bar over batches only when asked and when there is more than one batch.
    capsys.readouterr()
    generate(run, [0, 1, 2, 0, 1, 2])  # two batches of 4, 2
    generate(run, [0, 1], progress=True)  # one batch
    assert "batches" not in capsys.readouterr().err
    generate(run, [0, 1, 2, 0, 1, 2], progress=True)
    assert "batches" in capsys.readouterr().err
