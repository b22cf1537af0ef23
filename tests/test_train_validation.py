"""Trainer input checks (config, sample settings, --device), quickstart --resume, and objective-state resume."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditlab.cli import main
from ditlab.config import load_config
from ditlab.errors import DitlabError
from ditlab.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=4",
    "objective.kind=flow", "optim.batch_size=8", "optim.lr=1e-3", "train.ema_decay=0.99",
    "train.tensorboard=false", "train.progress=false", "train.log_every=1", "sample.sampler=euler",
    "sample.steps=2", "sample.num_samples=10",
]


def tiny(out: Path, *extra: str) -> list[str]:
    return [*TINY, f"train.out_dir={out}", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("extra, message", [
    (["train.log_every=0"], "train.log_every must be >= 1"),
    (["train.ckpt_every=-1"], "train.ckpt_every must be >= 0"),
    (["train.sample_every=-2"], "train.sample_every must be >= 0"),
    (["train.keep_last=-1"], "train.keep_last must be >= 0"),
    (["train.grad_accum=0"], "train.grad_accum must be >= 1"),
    (["train.ema_decay=1.0"], "train.ema_decay must be in [0, 1)"),
    (["train.ema_decay=-0.1"], "train.ema_decay must be in [0, 1)"),
    (["train.time_budget_s=-5"], "train.time_budget_s must be >= 0"),
    (["optim.batch_size=0"], "optim.batch_size must be >= 1"),
    (["optim.lr=0"], "optim.lr must be > 0"),
    (["optim.lr=-1e-4"], "optim.lr must be > 0"),
    (["optim.betas=[0.9]"], "optim.betas must be two numbers in [0, 1)"),
    (["optim.betas=[0.9,1.0]"], "optim.betas must be two numbers in [0, 1)"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0"),
    (["optim.grad_clip=-1"], "optim.grad_clip must be > 0"),
    (["optim.batch_size=6", "train.grad_accum=4"], "not divisible"),
    (["optim.name=sgd"], "unknown optim.name 'sgd' (choose adamw, muon)"),
    (["optim.name=muon", "train.fsdp=true"], "optim.name=muon needs whole matrices, which FSDP shards"),
])
def test_bad_optim_and_loop_settings_fail_before_any_work(tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=1", *extra)]) == 2
    assert message in _one_line_error(capsys)
    assert not (run / "checkpoints").exists()


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=2", "train.ckpt_every=1", "train.keep_last=0")]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]


@pytest.mark.parametrize("extra, message", [
    (["objective.kind=shortcut", "sample.sampler=shortcut", "sample.steps=3"], "power of two"),
    (["objective.kind=shortcut", "sample.sampler=shortcut", "sample.steps=256"], "power of two"),
    (["sample.sampler=heum"], "unknown sampler 'heum'"),  # a typo is not silently euler
    (["objective.kind=gaussian", "sample.sampler=ddpm", "sample.steps=1"], "steps must be between 2"),
    (["objective.kind=gaussian", "sample.sampler=ddim", "sample.steps=999"], "integer stride"),
    (["sample.steps=0"], "steps must be a positive integer"),
    (["model.class_dropout_prob=0", "sample.cfg_scale=4"], "needs a null label"),
])
def test_bad_sample_settings_fail_before_training(tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    assert main(["train", *tiny(run, "train.steps=2", "train.ckpt_every=1", *extra)]) == 2
    assert message in _one_line_error(capsys)
    assert not (run / "checkpoints").exists()  # nothing was trained or saved


def test_unset_sampler_and_steps_take_the_objective_defaults(tmp_path):
    trainer = Trainer(load_config(None, tiny(tmp_path / "run", "sample.sampler=null", "sample.steps=null")))
    assert trainer.objective.resolve_sampling(None, None) == ("euler", 250)
    assert trainer.objective.resolve_sampling("heun", 3) == ("heun", 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_device_cuda_without_cuda_is_an_error(tmp_path, capsys):
    assert main(["train", *tiny(tmp_path / "run", "train.steps=1"), "--device", "cuda"]) == 2
    assert "--device cuda requested but CUDA is not available" in _one_line_error(capsys)


def test_unknown_device_is_an_error(tmp_path, capsys):
    assert main(["train", *tiny(tmp_path / "run", "train.steps=1"), "--device", "tpu"]) == 2
    err = _one_line_error(capsys)
    assert "unknown --device 'tpu'" in err and "cpu or cuda" in err


def test_label_range_is_checked_before_the_device_copy(tmp_path):
    # On the meta device nothing can be read back: a check after the copy would crash, not raise.
    from ditlab.train.batch import prepare_batch

    meta = dict(num_classes=10, device=torch.device("meta"), gen_cpu=torch.Generator().manual_seed(0))
    x = torch.zeros(2, 1, 28, 28)
    xd, yd = prepare_batch(x, torch.tensor([0, 9]), **meta)
    assert xd.device.type == "meta" and yd.device.type == "meta"
    with pytest.raises(DitlabError, match="label 10 out of range 0..9"):
        prepare_batch(x, torch.tensor([3, 10]), **meta)


def _step_weights(step_dir: Path) -> dict:
    return load_file(step_dir / "model.safetensors")


def test_resume_restores_the_timestep_sampler_history(tmp_path):
    # T=2 and batch 16: the loss-second-moment sampler is warm (10 losses per t) by the step-3
    # checkpoint, so steps 4-6 draw t from its history; a resume that dropped it would draw uniformly.
    extra = ["objective.kind=gaussian", "objective.timestep_sampler=loss-second-moment",
             "objective.noise_schedule=squaredcos_cap_v2", "objective.diffusion_steps=2", "model.learn_sigma=true",
             "sample.sampler=ddpm", "optim.batch_size=16", "train.ckpt_every=3", "sample.num_samples=10"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["train", *tiny(full, "train.steps=6", *extra)]) == 0
    assert main(["train", *tiny(half, "train.steps=3", *extra)]) == 0
    state = torch.load(half / "checkpoints" / "step_0000003" / "state.pt", weights_only=True)
    assert state["objective"]["resampler"]["loss_counts"].tolist() == [10, 10]
    assert main(["train", *tiny(half, "train.steps=6", *extra), "--resume"]) == 0
    a = _step_weights(full / "checkpoints" / "step_0000006")
    b = _step_weights(half / "checkpoints" / "step_0000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


QUICK = ["--budget", "30", "--threads", "1", "model.hidden_size=32", "model.depth=1", "model.num_heads=2",
         "sample.steps=2", "train.tensorboard=false", "train.progress=false"]


def test_quickstart_rerun_needs_resume(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), *QUICK[2:], "train.steps=1", "train.time_budget_s=null"]) == 0
    assert "images until step 1 on" in capsys.readouterr().out  # no time budget: the step count bounds the run
    assert main(["quickstart", "--out", str(out), *QUICK, "train.steps=2"]) == 2
    err = _one_line_error(capsys)
    assert "already holds checkpoints" in err and "--resume" in err and "--out" in err
    assert main(["quickstart", "--out", str(out), *QUICK, "train.steps=2", "--resume"]) == 0
    assert "step_0000002" in capsys.readouterr().out
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_repo_quickstart_config_is_the_packaged_one():
    from ditlab.commands.quickstart import quickstart_config_path

    link = ROOT / "configs" / "quickstart.yaml"
    assert link.is_symlink() and link.resolve() == quickstart_config_path().resolve()


def test_quickstart_threads_follow_current_cpu_use():
    from ditlab.commands.quickstart import busy_cores, pick_threads

    assert pick_threads(3) == 3
    with pytest.raises(DitlabError, match="--threads"):
        pick_threads(0)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(interval=0.5) >= 0.8  # one core spinning is seen at once, unlike a load average
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("recognised, chosen, probed", [
    ({2.0: 1.0}, 2.0, [2.0]),
    ({2.0: 0.98, 2.5: 0.99}, 2.5, [2.0, 2.5]),  # 99% is enough
    ({2.0: 0.98, 2.5: 0.97, 3.0: 1.0}, 3.0, [2.0, 2.5, 3.0]),
    ({2.0: 0.5, 2.5: 0.8, 3.0: 0.9}, 5.0, [2.0, 2.5, 3.0]),  # the largest scale is taken without a probe
])
def test_quickstart_guidance_is_the_smallest_the_classifier_accepts(monkeypatch, recognised, chosen, probed):
    from types import SimpleNamespace

    import numpy as np

    from ditlab.commands import quickstart

    seen = []

    def fake_generate(run, labels, *, cfg_scale, seed):
        assert seed == 1
        seen.append(cfg_scale)
        return np.full((len(labels), 28, 28, 1), cfg_scale), labels

    monkeypatch.setattr(quickstart, "generate", fake_generate)
    monkeypatch.setattr(quickstart, "class_accuracy", lambda images, labels, dataset: recognised[float(images[0, 0, 0, 0])])
    run = SimpleNamespace(cfg=load_config(quickstart.quickstart_config_path()))
    assert quickstart.choose_guidance(run, np.arange(10).repeat(10), seed=1) == chosen
    assert seen == probed

    def no_classifier(images, labels, dataset):
        raise DitlabError("classifier weights missing")

    monkeypatch.setattr(quickstart, "class_accuracy", no_classifier)
    assert quickstart.choose_guidance(run, np.arange(10), seed=1) == run.cfg.sample.cfg_scale == 5.0


def tiny_dit(size: int, channels: int = 1, classes: int = 10):
    from ditlab.models.dit import DiT

    return DiT(input_size=size, patch_size=1, in_channels=channels, hidden_size=8, depth=1, num_heads=1,
               num_classes=classes)


def test_prepare_batch_flips_with_its_generator_and_checks_labels():
    """Flips drawn from `gen_cpu` (one uniform per image, flip below 1/2), whatever the global RNG:
    a paired batch keeps the first or the second half of its channels (image or mirror latents), a
    random flip mirrors the width; no flip unless asked; labels checked against num_classes."""
    from ditlab.errors import DitlabError
    from ditlab.train.batch import prepare_batch

    cpu = torch.device("cpu")
    x = torch.randn(8, 6, 2, 4, generator=torch.Generator().manual_seed(1))  # 3 channels + their mirror
    y = torch.arange(8)
    flips = (torch.rand(8, generator=torch.Generator().manual_seed(7)) < 0.5).tolist()
    assert 0 < sum(flips) < 8
    torch.manual_seed(123)
    paired, labels = prepare_batch(x, y, num_classes=10, device=cpu, gen_cpu=torch.Generator().manual_seed(7),
                                   paired_flip=True)
    assert torch.equal(labels, y)
    for i, f in enumerate(flips):
        assert torch.equal(paired[i], x[i, 3:] if f else x[i, :3])
    torch.manual_seed(456)
    mirrored, _ = prepare_batch(x, y, num_classes=10, device=cpu, gen_cpu=torch.Generator().manual_seed(7),
                                random_flip=True)
    for i, f in enumerate(flips):
        assert torch.equal(mirrored[i], x[i].flip(-1) if f else x[i])
    plain, _ = prepare_batch(x, y, num_classes=10, device=cpu, gen_cpu=torch.Generator().manual_seed(7))
    assert torch.equal(plain, x)
    with pytest.raises(DitlabError, match="label 1 out of range 0..0"):
        prepare_batch(x[:2], torch.tensor([0, 1]), num_classes=1, device=cpu, gen_cpu=torch.Generator())


def test_check_data_with_a_codec_checks_the_latent_grid():
    """With a tokenizer the model must fit its latent grid (4x4 patches to 16 channels: 7x7x16 for
    28x28 digits), and the images its input channels."""
    from ditlab.codecs.tokenizers import ConvTokenizer
    from ditlab.data.mnist import ImageTensorDataset
    from ditlab.errors import DitlabError
    from ditlab.train.batch import check_data

    digits = ImageTensorDataset(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]), num_classes=10)
    tokenizer = ConvTokenizer("conv2", 16)
    check_data(digits, tokenizer, tiny_dit(7, channels=16))
    for channels, size in ((1, 28), (16, 14), (8, 7)):
        with pytest.raises(DitlabError, match=r"data gives samples of shape \[16, 7, 7\]"):
            check_data(digits, tokenizer, tiny_dit(size, channels=channels))
    rgb = ImageTensorDataset(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), torch.tensor([0, 1]), num_classes=10)
    with pytest.raises(DitlabError, match="the data has 3 channel"):
        check_data(rgb, tokenizer, tiny_dit(7, channels=16))


def test_batches_through_a_codec_and_the_data_checks_at_their_bounds():
    """On-the-fly encoding draws its noise from a generator seeded by `gen_cpu` (reproducible whatever
    the global RNG); paired latents count half their channels; labels are checked only for a
    conditional model; an unconditional model samples without guidance whatever the config says."""
    from ditlab.config import SampleConfig
    from ditlab.data.mnist import ImageTensorDataset
    from ditlab.errors import DitlabError
    from ditlab.objectives.flow import FlowObjective
    from ditlab.objectives.guidance import check_guidance
    from ditlab.train.batch import check_data, check_image_run, prepare_batch

    class NoisyCodec:  # what matters of a VAE here: encode(x, generator) samples
        def encode(self, x, generator):
            return 2 * x + torch.randn(x.shape, generator=generator)

    x, y = torch.randn(4, 1, 4, 4), torch.arange(4)

    def encoded(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return prepare_batch(x, y, num_classes=10, device=torch.device("cpu"),
                             gen_cpu=torch.Generator().manual_seed(seed), codec=NoisyCodec())[0]

    first = encoded(0, 1)
    assert torch.equal(first, encoded(0, 2)) and not torch.equal(first, encoded(1, 1))
    assert 0.5 < float((first - 2 * x).std()) < 2  # encoded: the codec's noise on top of 2 x

    paired = ImageTensorDataset(torch.zeros(2, 8, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), num_classes=2)
    paired.paired_flip = True
    check_data(paired, None, tiny_dit(4, channels=4, classes=2))  # 8 stored channels: 4 of the image, 4 of its mirror
    with pytest.raises(DitlabError, match=r"shape \[4, 4, 4\]"):
        check_data(paired, None, tiny_dit(4, channels=8, classes=2))

    labelled = ImageTensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), num_classes=2)
    check_data(labelled, None, tiny_dit(4, classes=0))  # an unconditional model ignores the labels
    with pytest.raises(DitlabError, match="data has labels 0..1 but model.num_classes is 1"):
        check_data(labelled, None, tiny_dit(4, classes=1))
    unlabelled = ImageTensorDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 0]), num_classes=2)
    del unlabelled.num_classes  # a dataset that does not say how many classes it has
    check_data(unlabelled, None, tiny_dit(4, classes=1))
    check_image_run(labelled, None, tiny_dit(4, classes=0), FlowObjective(), SampleConfig(cfg_scale=5.0))  # no guidance to check
    with pytest.raises(DitlabError):  # what check_image_run must not ask of an unconditional model
        check_guidance(tiny_dit(4, classes=0), 5.0)
