"""Conv autoencoder tokenizers: shapes, training, PSNR, files, and the codec path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ditlab.cli import main
from ditlab.config import VAEConfig
from ditlab.errors import DitlabError
from ditlab.codecs import latent_shape, load_codec
from ditlab.codecs.tokenizers import TOKENIZER_KINDS, ConvTokenizer, load_tokenizer, psnr, save_tokenizer
from ditlab.train.tokenizer import train_tokenizer


def digits(n: int = 64) -> torch.Tensor:
    """Structured stand-in images in [-1, 1]: random bars on a dark background."""
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(n, 1, 28, 28)
    for i in range(n):
        r, c = torch.randint(2, 18, (2,), generator=g).tolist()
        x[i, :, r : r + 8, c : c + 3] = 1.0
        x[i, :, r : r + 3, c : c + 8] = 0.5
    return x


@pytest.mark.parametrize("kind", list(TOKENIZER_KINDS))
def test_encode_decode_shapes(kind):
    down, dims = TOKENIZER_KINDS[kind]
    x = digits(3)
    for d in dims:
        tok = ConvTokenizer(kind, d)
        z = tok.encode(x)
        assert z.shape == (3, d, 28 // down, 28 // down)
        assert latent_shape(tok, 28, 1) == (d, 28 // down, 28 // down)
        assert tok.decode(z).shape == x.shape


def test_training_improves_reconstruction():
    torch.manual_seed(0)
    x = digits()
    for kind, d in (("conv1", 4), ("conv2", 16)):
        tok = ConvTokenizer(kind, d, hidden=32)
        before = psnr(tok.reconstruct(x).detach(), x)
        losses = train_tokenizer(tok, x, 60, batch_size=32, lr=3e-3, generator=torch.Generator().manual_seed(0))
        after = psnr(tok.reconstruct(x).detach(), x)
        assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
        assert after > before + 3.0, (kind, before, after)


def test_psnr_closed_form():
    ref = torch.zeros(2, 1, 4, 4)
    x = ref + 0.1  # MSE = 0.01 -> 10 log10(2^2 / 0.01) = 26.0206 dB for [-1, 1] images
    assert psnr(x, ref) == pytest.approx(10 * math.log10(400.0))
    assert psnr(x, ref, data_range=1.0) == pytest.approx(20.0)
    assert psnr(ref, ref) == math.inf
    tm = pytest.importorskip("torchmetrics")
    y = torch.rand(3, 1, 8, 8) * 2 - 1
    z = (y + 0.05 * torch.randn_like(y)).clamp(-1, 1)
    ref_val = tm.image.PeakSignalNoiseRatio(data_range=(-1.0, 1.0))(z, y).item()
    assert psnr(z, y) == pytest.approx(ref_val, abs=1e-3)


def test_normalisation_gives_unit_std_and_roundtrips(tmp_path):
    x = digits()
    tok = ConvTokenizer("conv2", 16, hidden=16)
    train_tokenizer(tok, x, 5, batch_size=32)
    tok.fit_normalisation(x)
    z = tok.encode(x)
    flat = z.transpose(0, 1).reshape(16, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(16), atol=1e-4, rtol=0)
    # Normalisation is undone by decode: decode(encode(x)) == raw reconstruction.
    torch.testing.assert_close(tok.decode(z), tok.reconstruct(x).detach(), atol=1e-5, rtol=1e-5)
    # Saved and reloaded through load_codec (file or its directory), identical latents.
    f = tmp_path / "tokenizer.safetensors"
    save_tokenizer(tok, f)
    for path in (f, tmp_path):
        codec = load_codec(VAEConfig(path=str(path)))
        assert isinstance(codec, ConvTokenizer) and codec.kind == "conv2" and codec.token_dim == 16
        torch.testing.assert_close(codec.encode(x), z, rtol=0, atol=0)


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(DitlabError, match="kind"):
        ConvTokenizer("conv3", 16)
    tok = ConvTokenizer("conv2", 16)
    with pytest.raises(DitlabError, match="divisible"):
        tok.encode(torch.zeros(1, 1, 30, 30))
    with pytest.raises(DitlabError, match="latents"):
        tok.decode(torch.zeros(1, 8, 7, 7))
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other))
    with pytest.raises(DitlabError, match="not a ditlab tokenizer"):
        load_tokenizer(other)


def test_conv2_is_two_strided_convolutions_with_a_silu_between():
    """The notes' 2-layer tokenizer written out with F.conv2d / F.conv_transpose2d (defaults: 4x4
    patches to 16 channels through 64 hidden, one input channel)."""
    import torch.nn.functional as F

    tok = ConvTokenizer()
    assert (tok.kind, tok.token_dim, tok.image_channels, tok.hidden, tok.downsample) == ("conv2", 16, 1, 64, 4)
    e1, e2 = tok.encoder[0], tok.encoder[2]
    d1, d2 = tok.decoder[0], tok.decoder[2]
    x = digits(4)
    raw = F.conv2d(F.silu(F.conv2d(x, e1.weight, e1.bias, stride=2)), e2.weight, e2.bias, stride=2)
    with torch.no_grad():
        tok.latent_mean.copy_(torch.linspace(-1, 1, 16))
        tok.latent_std.copy_(torch.linspace(0.5, 2, 16))
    z = tok.encode(x)
    mean, std = tok.latent_mean.view(1, -1, 1, 1), tok.latent_std.view(1, -1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    pixels = F.conv_transpose2d(F.silu(F.conv_transpose2d(z * std + mean, d1.weight, d1.bias, stride=2)),
                                d2.weight, d2.bias, stride=2)
    torch.testing.assert_close(tok.decode(z), pixels)
    torch.testing.assert_close(tok.decode(z.double()), pixels)  # float64 latents (a sampler's) decode too


@pytest.mark.parametrize("sizes, ok", [((1, 1, 1), True), ((0, 1, 1), False), ((1, 0, 1), False), ((1, 1, 0), False)])
def test_tokenizer_sizes_must_be_positive(sizes, ok):
    token_dim, in_channels, hidden = sizes
    if ok:
        tok = ConvTokenizer("conv2", token_dim, in_channels, hidden)
        assert tok.encode(torch.zeros(1, 1, 8, 8)).shape == (1, 1, 2, 2)
    else:
        with pytest.raises(DitlabError, match="sizes must be positive"):
            ConvTokenizer("conv2", token_dim, in_channels, hidden)


def test_tokenizer_files_load_from_their_folder_and_must_match_their_metadata(tmp_path):
    from safetensors.torch import save_file

    tok = ConvTokenizer("conv1", 8)
    save_tokenizer(tok, tmp_path / "tokenizer.safetensors")
    loaded = load_tokenizer(tmp_path)  # a folder holding tokenizer.safetensors
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tok.state_dict().items())
    state = {k: v.contiguous() for k, v in tok.state_dict().items() if k != "latent_std"}
    save_file(state, str(tmp_path / "partial.safetensors"), metadata=tok.metadata())
    with pytest.raises(DitlabError, match="does not match its metadata: missing .'latent_std'."):
        load_tokenizer(tmp_path / "partial.safetensors")


def test_cli_trains_and_writes(tmp_path, capsys):
    out = tmp_path / "tok"
    code = main(["train-tokenizer", "--kind", "conv1", "--token-dim", "8", "--data", "mnist-embedded",
                 "--steps", "30", "--batch-size", "32", "--lr", "1e-2", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["latent_shape"] == [8, 14, 14] and metrics["test_images"] == 500
    # The reported PSNR is that of the saved tokenizer's clipped reconstructions of the held-out
    # images (every 10th of the embedded sample), recomputed here: 10 log10(2^2 / MSE).
    from ditlab.data.mnist import load_embedded_mnist

    held_out = load_embedded_mnist()[0][::10].float() / 127.5 - 1.0
    tok = load_tokenizer(out / "tokenizer.safetensors")
    with torch.no_grad():
        recon = tok.reconstruct(held_out).clamp(-1, 1)
    mse = float(((recon.double() - held_out.double()) ** 2).mean())
    # float32 reconstructions: MSE to a relative 1e-6 at most, i.e. 4.4e-6 dB
    assert metrics["test_psnr"] == pytest.approx(10 * math.log10(4.0 / mse), abs=1e-4)
    assert "test PSNR" in capsys.readouterr().out
    codec = load_codec(VAEConfig(path=str(out / "tokenizer.safetensors")))
    assert latent_shape(codec, 28, 1) == (8, 14, 14)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kind", "conv2", "--token-dim", "8"], "not offered for conv2"),
        (["--kind", "conv1", "--token-dim", "4", "--data", "folder"], "mnist-embedded, mnist or fashion-mnist"),
        (["--kind", "conv1", "--token-dim", "4", "--data", "mnist", "--data-path", "/nonexistent"], "not found"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, args, message):
    code = main(["train-tokenizer", *args, "--steps", "1", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_unwritable_out_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "f.txt"
    blocker.write_text("a regular file, so no folder can be made under it")
    code = main(["train-tokenizer", "--kind", "conv1", "--token-dim", "4", "--steps", "1", "--out", str(blocker / "out")])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: cannot write ") and len(err.strip().splitlines()) == 1
    assert "training" not in out  # checked before any training time is spent


def test_dit_trains_on_token_grid_end_to_end(tmp_path):
    """configs/mnist_tokenizer.yaml with a tiny tokenizer: the trainer encodes through it, samples decode."""
    from pathlib import Path

    tok = ConvTokenizer("conv2", 16, hidden=16)
    x = digits(32)
    train_tokenizer(tok, x, 5, batch_size=16)
    tok.fit_normalisation(x)
    save_tokenizer(tok, tmp_path / "tokenizer.safetensors")
    config = Path(__file__).resolve().parents[1] / "configs" / "mnist_tokenizer.yaml"
    run = tmp_path / "run"
    code = main(["train", str(config), f"vae.path={tmp_path / 'tokenizer.safetensors'}", f"train.out_dir={run}",
                 "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "optim.batch_size=8",
                 "train.steps=2", "train.ckpt_every=2", "train.log_every=1", "train.tensorboard=false",
                 "train.progress=false", "sample.num_samples=4", "sample.batch_size=4", "sample.steps=2"])
    assert code == 0
    pngs = sorted((run / "samples").glob("*.png"))
    assert pngs, "the trainer wrote no decoded sample grid"
    from PIL import Image

    w, h = Image.open(pngs[-1]).size
    assert w >= 28 and h >= 28  # decoded back to pixel images, not a 7x7 latent grid
