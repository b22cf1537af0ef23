"""What the layered package keeps from the one before it: official names and signatures, runs
written by ditlab 0.1, one Objective interface, and config sections that refuse foreign fields."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.cli import main
from ditlab.config import load_config, load_run_config
from ditlab.errors import DitlabError
from ditlab.objectives import FlowObjective, GaussianObjective, ShortcutObjective, build_objective
from ditlab.runs import latest_checkpoint, load_run, load_state
from ditlab.sampling import generate

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v0.1"


def test_official_names_and_signature():
    from ditlab.diffusion import create_diffusion
    from ditlab.models import DiT, DiT_models

    params = inspect.signature(create_diffusion).parameters
    assert list(params)[:2] == ["timestep_respacing", "noise_schedule"] and params["noise_schedule"].default == "linear"
    assert {"use_kl", "sigma_small", "predict_xstart", "learn_sigma", "rescale_learned_sigmas", "diffusion_steps"} <= set(params)
    assert create_diffusion("10").num_timesteps == 10
    assert len(DiT_models) == 12 and isinstance(DiT_models["DiT-S/8"](input_size=8, num_classes=2), DiT)


def test_a_field_of_another_objective_kind_is_an_error():
    with pytest.raises(DitlabError, match=r"objective.prediction='noise' belongs to objective.kind flow, not gaussian"):
        load_config(None, ["objective.kind=gaussian", "objective.prediction=noise"])
    with pytest.raises(DitlabError, match=r"objective.diffusion_steps=100 belongs to objective.kind gaussian, not flow"):
        load_config(None, ["objective.kind=flow", "objective.diffusion_steps=100"])
    with pytest.raises(DitlabError, match="sample.eta=0.5 applies to Gaussian diffusion"):
        load_config(None, ["objective.kind=shortcut", "sample.eta=0.5"])
    load_config(None, ["objective.kind=flow", "objective.prediction=noise"])  # its own field is fine
    assert main(["train", "objective.kind=gaussian", "objective.cosine_loss_weight=1"]) == 2  # before any work


def test_old_config_files_load_through_the_shim(tmp_path):
    legacy = LEGACY / "gaussian_config.yaml"
    with pytest.raises(DitlabError, match="time_sampling"):
        load_config(legacy)  # as user input it is refused ...
    cfg = load_run_config(legacy)  # ... as a run's saved config it loads: the field never took effect
    assert cfg.objective.kind == "gaussian" and cfg.objective.time_sampling == "uniform"
    assert cfg.sample.sampler == "ddim"
    old_3d = tmp_path / "old_3d.yaml"  # 0.1's `3d` layout made channels a token axis
    old_3d.write_text(legacy.read_text().replace("token_layout: 2d", "token_layout: 3d"))
    assert load_run_config(old_3d).model.token_layout == "channels_as_tokens"
    new_3d = tmp_path / "new_3d.yaml"
    new_3d.write_text("format_version: 2\nmodel:\n  token_layout: 3d\n")
    assert load_run_config(new_3d).model.token_layout == "3d"  # written by this version: as it says
    flow = load_run_config(LEGACY / "flow_run" / "config.yaml")
    assert flow.sample.sampler is None  # 0.1's default "ddpm" meant "the objective's own sampler"
    assert build_objective(flow).resolve_sampling(flow.sample.sampler, None) == ("euler", 250)


def test_a_run_written_by_ditlab_0_1_samples_as_it_did(tmp_path):
    run = load_run(LEGACY / "flow_run")
    step_cfg = load_run_config(LEGACY / "flow_run" / "checkpoints" / "step_0000002" / "config.yaml")
    assert run.step == 2 and run.objective.data_std == step_cfg.objective.data_std is not None
    images, labels = generate(run, np.arange(4) % 10, steps=3, cfg_scale=2.0)
    with np.load(LEGACY / "flow_run_samples.npz") as old:
        assert (labels == old["labels"]).all()
        # The same float computation; another CPU may round a value across a uint8 level, not more.
        assert np.abs(images.astype(int) - old["arr_0"].astype(int)).max() <= 1
    # through the command line, too
    assert main(["sample", "--ckpt", str(LEGACY / "flow_run"), "--num-samples", "4", "--steps", "3", "--cfg-scale", "2",
                 "--out-npz", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], images)


def test_a_run_written_by_ditlab_0_1_resumes_with_its_measured_std(tmp_path):
    run = tmp_path / "flow_run"
    shutil.copytree(LEGACY / "flow_run", run)
    measured = load_run_config(run / "checkpoints" / "step_0000002" / "config.yaml").objective.data_std
    cfg = load_run_config(run / "config.yaml")
    args = [f"{section}.{k}={v}" for section, k, v in (("train", "out_dir", run), ("train", "steps", 3),
                                                      ("train", "progress", "false"))]
    assert main(["train", str(run / "config.yaml"), *args, "sample.sampler=euler", "--resume"]) == 0
    state = load_state(latest_checkpoint(run))
    assert state["step"] == 3 and state["objective"]["data_std"] == measured  # not measured again
    assert cfg.objective.data_std is None  # (0.1 wrote the run's own config.yaml before measuring)


@pytest.mark.parametrize("objective, good, typo", [
    (GaussianObjective(diffusion_steps=50), ("ddpm", 10), "euler"),
    (FlowObjective(), ("heun", 3), "ddim"),
    (ShortcutObjective(), ("shortcut", 8), "euler"),
])
def test_one_objective_interface(objective, good, typo):
    assert objective.default_sampler == objective.samplers[0]
    sampler, steps = objective.resolve_sampling(None, None)
    assert sampler == objective.default_sampler and steps == objective.default_steps
    objective.check_sampling(*good)
    with pytest.raises(DitlabError, match=f"unknown sampler '{typo}'"):
        objective.check_sampling(typo, good[1])
    with pytest.raises(DitlabError, match="steps"):
        objective.check_sampling(good[0], 0)
    objective.load_state_dict(objective.state_dict())  # a no-op where stateless
    # last_nfe counts the model calls of the last sample
    calls = []

    def model(x, t, y, **kw):
        calls.append(1)
        return torch.zeros(x.shape[0], 2 * x.shape[1] if isinstance(objective, GaussianObjective) else x.shape[1],
                           *x.shape[2:])

    model.num_classes, model.in_channels = 0, 1
    objective.sample(model, torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), sampler=good[0], steps=good[1])
    assert objective.last_nfe == len(calls) > 0
