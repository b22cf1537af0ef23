"""`ditlab sample` end to end: tiny random DiTs (ditlab and official-style checkpoints) and a tiny
random diffusers AutoencoderKL saved to a temp dir; determinism; one-line errors on bad input."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.cli import main
from ditlab.config import config_from_dict
from ditlab.io import load_npz, save_grid, save_npz, to_uint8
from ditlab.models import build_model
from ditlab.models.dit import DiT
from ditlab.train.checkpoint import save_checkpoint

TINY = {"name": "DiT-S/2", "hidden_size": 32, "depth": 1, "num_heads": 2, "input_size": 8, "in_channels": 1}
TINY_FLAGS = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2"]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # DiT zero-initialises its output layers; random weights make the samples depend on them.
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05


def _run_dir(root, num_classes: int, objective: str = "gaussian"):
    cfg = config_from_dict({"model": dict(TINY, num_classes=num_classes, learn_sigma=objective == "gaussian"),
                            "objective": {"kind": objective}})
    model = build_model(cfg)
    _randomise(model, 0)
    ema = build_model(cfg)
    _randomise(ema, 1)
    save_checkpoint(root, 10, model.state_dict(), ema.state_dict(), {}, cfg)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    out = {"cond": _run_dir(root / "cond", 3), "uncond": _run_dir(root / "uncond", 0),
           "flow": _run_dir(root / "flow", 3, "flow")}  # its config carries the default sample.sampler=ddpm
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "vae")
    out["vae"] = root / "vae"
    # An official-style training checkpoint: {"model", "ema", "args"} with 4-channel latents.
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    _randomise(dit, 2)
    torch.save({"model": dit.state_dict(), "ema": dit.state_dict(), "args": argparse.Namespace(model="DiT-S/2")},
               root / "official.pt")
    out["official"] = root / "official.pt"
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    out["garbage"] = root / "garbage.pt"
    return out


def _sample(capsys, *argv) -> tuple[int, str]:
    code = main(["sample", "--no-progress", *map(str, argv)])
    return code, capsys.readouterr().err


def test_pixel_checkpoint_png_and_npz(files, tmp_path, capsys):
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    code, err = _sample(capsys, "--ckpt", files["cond"], "--labels", "0,1,2", "--num-samples", 5, "--steps", 4,
                        "--out-png", png, "--out-npz", npz, "--caption")
    assert code == 0, err
    images, labels = load_npz(npz)
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 0, 1] and labels.dtype == np.int64
    with np.load(npz) as f:
        assert sorted(f.files) == ["arr_0", "labels"]
    assert Image.open(png).size[0] > 8 * 3
    # The images are the EMA run's samples of those labels, with the command's steps and the config's
    # seed: the library call `ditlab sample` should make (a random DiT's samples differ per label).
    from ditlab.runs import load_run
    from ditlab.sampling import generate

    expected, _ = generate(load_run(files["cond"], ema=True), [0, 1, 2, 0, 1], steps=4)
    assert np.array_equal(images, expected)
    assert not np.array_equal(images, generate(load_run(files["cond"], ema=False), [0, 1, 2, 0, 1], steps=4)[0])


def test_load_run_reads_what_the_step_saved(files, tmp_path):
    """Default EMA weights, the saved step, the saved objective state, the requested device, and a
    mismatch error naming the file that does not fit."""
    from safetensors.torch import load_file, save_file

    from ditlab.errors import DitlabError
    from ditlab.runs import load_run

    step = files["cond"] / "checkpoints" / "step_0000010"
    run = load_run(files["cond"])
    assert run.weights == step / "ema.safetensors" and run.step == 10
    ema = load_file(step / "ema.safetensors")
    assert all(torch.equal(value, ema[name]) for name, value in run.model.state_dict().items())
    assert next(load_run(files["cond"], device="meta").model.parameters()).is_meta

    cfg = config_from_dict({"model": dict(TINY, num_classes=3, learn_sigma=False),
                            "objective": {"kind": "flow", "data_std_target": 0.82}})
    model = build_model(cfg)
    save_checkpoint(tmp_path / "std", 4, model.state_dict(), model.state_dict(), {"objective": {"data_std": 0.37}}, cfg)
    assert load_run(tmp_path / "std").objective.data_std == 0.37  # as measured in training, not re-measured

    bad = tmp_path / "std" / "checkpoints" / "step_0000004" / "ema.safetensors"
    save_file({k: v[..., :1].contiguous() if v.ndim else v for k, v in model.state_dict().items()}, bad)
    with pytest.raises(DitlabError, match=re.escape(f"checkpoint {bad}")):
        load_run(tmp_path / "std")


def test_same_seed_same_samples(files, tmp_path, capsys):
    def npz_for(seed, sampler, *extra):
        path = tmp_path / f"{seed}-{sampler}-{len(extra)}.npz"
        code, err = _sample(capsys, "--ckpt", files["cond"], "--num-samples", 4, "--steps", 3, "--seed", seed,
                            "--sampler", sampler, "--batch-size", 3, "--out-npz", path, *extra)
        assert code == 0, err
        return load_npz(path)[0]

    for sampler in ("ddpm", "ddim"):
        assert np.array_equal(npz_for(7, sampler), npz_for(7, sampler))
    assert not np.array_equal(npz_for(7, "ddpm"), npz_for(8, "ddpm"))
    # --no-ema samples the raw weights, which differ from the EMA here.
    assert not np.array_equal(npz_for(7, "ddpm"), npz_for(7, "ddpm", "--no-ema"))


def test_official_checkpoint_with_vae(files, tmp_path, capsys):
    npz = tmp_path / "latent.npz"
    code, err = _sample(capsys, "--ckpt", files["official"], "--model", "DiT-S/2", "--image-size", 16,
                        "--num-classes", 5, "--vae", files["vae"], *TINY_FLAGS, "--labels", "4,0", "--steps", 3,
                        "--cfg-scale", 4, "--sampler", "ddim", "--out-npz", npz, "--out-png", tmp_path / "l.png")
    assert code == 0, err
    images, labels = load_npz(npz)
    # The VAE halves the side once (two blocks): 8x8x4 latents decode to 16x16 RGB.
    assert images.shape == (2, 16, 16, 3) and labels.tolist() == [4, 0]


def test_random_labels_are_seeded(files, tmp_path, capsys):
    def labels(seed):
        path = tmp_path / f"r{seed}.npz"
        code, err = _sample(capsys, "--ckpt", files["cond"], "--num-samples", 12, "--random-labels", "--seed", seed,
                            "--steps", 2, "--out-npz", path)
        assert code == 0, err
        return load_npz(path)[1]

    a = labels(0)
    assert np.array_equal(a, labels(0)) and not np.array_equal(a, labels(1))
    assert set(a.tolist()) <= {0, 1, 2} and len(set(a.tolist())) > 1


def test_unconditional_model_samples_without_labels(files, tmp_path, capsys):
    npz = tmp_path / "u.npz"
    code, err = _sample(capsys, "--ckpt", files["uncond"], "--num-samples", 2, "--steps", 2, "--out-npz", npz)
    assert code == 0, err
    assert load_npz(npz)[1].tolist() == [-1, -1]


def _one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_inputs_give_one_line(files, tmp_path, capsys):
    out = ["--out-npz", tmp_path / "x.npz", "--steps", 2]
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["official"], "--model", "DiT-Q/2", *out))
    assert "unknown model 'DiT-Q/2'" in msg
    # A checkpoint that does not match the model: the message names the keys and shapes.
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "model.depth=2", *out))
    assert "missing keys: blocks.1." in msg
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "model.hidden_size=64", *out))
    assert "shape mismatch" in msg and "(32" in msg
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["uncond"], "--cfg-scale", 4, *out))
    assert "num_classes=0" in msg
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["garbage"], "--model", "DiT-S/2", *out))
    assert "cannot read checkpoint" in msg
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["official"], *out))
    assert "--model" in msg
    msg = _one_line_error(*_sample(capsys, "--ckpt", tmp_path / "nope", *out))
    assert "not found" in msg
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "--labels", "0,7", *out))
    assert "out of range" in msg
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "--sampler", "euler", *out))
    assert "ddpm, ddim" in msg
    # An official latent model without a VAE cannot be turned into images.
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["official"], "--model", "DiT-S/2", "--image-size", 8,
                                   "--num-classes", 5, "--in-channels", 4, *TINY_FLAGS, *out))
    assert "--vae" in msg


def test_image_helpers_roundtrip(tmp_path):
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 2, 3)
    u = to_uint8(x)
    assert u.shape == (1, 2, 3, 1) and u.dtype == np.uint8
    # round((x + 1) * 127.5), clamped: the mapping of DiT's sample_ddp.py
    assert u.ravel().tolist() == [0, 64, 128, 255, 255, 255]
    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    save_npz(tmp_path / "a.npz", rgb, [1, 2, 3, 4, 5])
    back, labels = load_npz(tmp_path / "a.npz")
    assert np.array_equal(back, rgb) and labels.tolist() == [1, 2, 3, 4, 5]
    grid = np.asarray(Image.open(save_grid(tmp_path / "g.png", rgb, nrow=2)))
    assert grid.shape == (3 * 6 + 2, 2 * 6 + 2, 3)
    assert np.array_equal(grid[2:6, 8:12], rgb[1])  # second image: first row, second column


def test_unknown_sampler_is_an_error_not_the_default(files, tmp_path, capsys):
    out = ["--out-npz", tmp_path / "x.npz", "--steps", 2, "--num-samples", 2]
    for ckpt, choices in (("cond", "ddpm, ddim"), ("flow", "euler, heun, dopri5")):
        msg = _one_line_error(*_sample(capsys, "--ckpt", files[ckpt], "sample.sampler=heum", *out))
        assert "'heum'" in msg and choices in msg
    # A flow run's config carries the default "ddpm": that means flow's default sampler, euler...
    assert main(["sample", "--no-progress", "--ckpt", str(files["flow"]), *map(str, out)]) == 0
    assert "(euler, 2 steps" in capsys.readouterr().out
    # ... but asking for it by flag is an error.
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["flow"], "--sampler", "ddpm", *out))
    assert "'ddpm'" in msg and "euler" in msg


def test_eta_is_refused_unless_the_sampler_is_ddim(files, tmp_path, capsys):
    out = ["--out-npz", tmp_path / "x.npz", "--steps", 2, "--num-samples", 2]
    for ckpt, flags in (("cond", ["--sampler", "ddpm"]), ("cond", []), ("flow", [])):
        msg = _one_line_error(*_sample(capsys, "--ckpt", files[ckpt], *flags, "--eta", 0.7, *out))
        assert "eta" in msg and "ddim" in msg
    code, err = _sample(capsys, "--ckpt", files["cond"], "--sampler", "ddim", "--eta", 0.7, *out)
    assert code == 0, err


def test_guidance_interval_reaches_gaussian_sampling(files, tmp_path, capsys):
    def images(*extra):
        path = tmp_path / f"g{len(list(tmp_path.iterdir()))}.npz"
        code, err = _sample(capsys, "--ckpt", files["cond"], "--num-samples", 2, "--steps", 4, "--cfg-scale", 4,
                            "--out-npz", path, *extra)
        assert code == 0, err
        return load_npz(path)[0]

    full = images()
    assert np.array_equal(images("sample.guidance_interval=[0.0,1.0]"), full)
    # 4 DDPM steps visit t = 999, 666, 333, 0: [0.5, 1] guides only the first two, so the samples change.
    assert not np.array_equal(images("sample.guidance_interval=[0.5,1.0]"), full)
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "--cfg-scale", 4, "--steps", 2,
                                   "sample.guidance_interval=[0.9,0.1]", "--out-npz", tmp_path / "bad.npz"))
    assert "sample.guidance_interval" in msg and "[0.9, 0.1]" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_gives_one_line(files, tmp_path, capsys):
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "--device", "cuda", "--out-npz", tmp_path / "x.npz"))
    assert msg == "error: --device cuda requested but CUDA is not available"


def test_unknown_device_gives_one_line(files, tmp_path, capsys):
    for device in ("tpu9", "cuda:x", ""):
        msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "--device", device, "--out-npz", tmp_path / "x.npz"))
        assert f"unknown --device '{device}'" in msg and "cpu, cuda" in msg


def test_unwritable_outputs_give_one_line(files, tmp_path, capsys):
    # A path below a regular file cannot be created, even by root.
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for flag, name in (("--out-png", "x.png"), ("--out-npz", "x.npz"), ("--out-png", "sub/x.png")):
        msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "--steps", 2, "--num-samples", 1,
                                       flag, blocker / name))
        assert f"cannot write {blocker / name}" in msg
    assert blocker.read_text() == "not a folder"
    msg = _one_line_error(*_sample(capsys, "--ckpt", files["cond"], "--steps", 2, "--num-samples", 1,
                                   "--out-png", tmp_path / "grid.nopng"))
    assert "cannot write" in msg and "extension" in msg


def test_generate_labels_as_documented():
    from ditlab.errors import DitlabError
    from ditlab.runs import build_run
    from ditlab.sampling import generate

    cond = build_run(config_from_dict({"model": dict(TINY, num_classes=3)}))
    with pytest.raises(DitlabError, match=r"labels must be in \[0, 2\]"):
        generate(cond, [0, -1], sampler="ddim", steps=2)
    uncond = build_run(config_from_dict({"model": dict(TINY, num_classes=0)}))
    images, labels = generate(uncond, [5, -3], sampler="ddim", steps=2)
    assert images.shape == (2, 8, 8, 1) and labels.tolist() == [-1, -1]
