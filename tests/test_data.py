"""Data sources: embedded MNIST, verified IDX files, image folders, and extracted latents."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.cli import main
from ditlab.config import load_config
from ditlab.data import build_dataset
from ditlab.data.folder import center_crop_arr
from ditlab.errors import DitlabError

DATA = Path(os.environ.get("DITLAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TRAIN_TINY = [
    "model.name=DiT-S/4", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "objective.kind=flow",
    "optim.batch_size=4", "train.steps=2", "train.tensorboard=false", "train.progress=false",
    "sample.sampler=euler", "sample.steps=1", "sample.num_samples=4",
]


def test_embedded_mnist_is_500_digits_per_class_in_pixel_range():
    ds = build_dataset(load_config())
    assert len(ds) == 5000 and np.bincount(ds.labels.numpy()).tolist() == [500] * 10
    assert ds.labels.tolist() == sorted(ds.labels.tolist())  # class by class
    for i in (0, 1234, 4999):
        x, label = ds[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and label.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9  # a digit, not an empty frame


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="shared MNIST not available")
def test_embedded_mnist_is_the_first_500_training_digits_of_each_class():
    from ditlab.data.mnist import embedded_mnist_path, read_idx_images, read_idx_labels

    images = read_idx_images(DATA / "mnist" / "train-images-idx3-ubyte.gz")
    labels = read_idx_labels(DATA / "mnist" / "train-labels-idx1-ubyte.gz")
    first = torch.cat([torch.nonzero(labels == c).flatten()[:500] for c in range(10)])
    ds = build_dataset(load_config())
    assert torch.equal(ds.images, images[first]) and torch.equal(ds.labels, labels[first].long())
    with np.load(embedded_mnist_path()) as f:  # the provenance stored beside the pixels
        assert f["train_index"].tolist() == first.tolist()


def test_embedded_mnist_refuses_a_corrupt_file(tmp_path, monkeypatch):
    from ditlab.data import mnist

    with np.load(mnist.embedded_mnist_path()) as f:
        arrays = {k: f[k].copy() for k in f.files}
    arrays["images"][0, 14, 14] ^= 1  # one flipped bit in one pixel
    np.savez_compressed(tmp_path / "bad.npz", **arrays)
    monkeypatch.setattr(mnist, "embedded_mnist_path", lambda: tmp_path / "bad.npz")
    mnist._embedded_arrays.cache_clear()
    try:
        with pytest.raises(DitlabError, match="fails its checksum"):
            mnist.load_embedded_mnist()
    finally:
        mnist._embedded_arrays.cache_clear()


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="shared MNIST not available")
@pytest.mark.parametrize("source, first_train, first_test", [("mnist", 5, 7), ("fashion-mnist", 9, 9)])
def test_idx_datasets(source, first_train, first_test):
    for split, n, first in (("train", 60000, first_train), ("test", 10000, first_test)):
        cfg = load_config(None, [f"data.source={source}", f"data.path={DATA / source}", f"data.split={split}"])
        ds = build_dataset(cfg)
        assert len(ds) == n and int(ds[0][1]) == first  # published first labels
        assert ds.images.dtype == torch.uint8 and int(ds.images.max()) == 255


def _idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes, truncate: int | None = None) -> None:
    data = struct.pack(">I" + "I" * len(dims), magic, *dims) + payload
    raw = gzip.compress(data)
    path.write_bytes(raw[:truncate] if truncate else raw)


@pytest.mark.parametrize("case, message", [
    ("missing", "missing data file"),
    ("magic", "bad IDX magic"),
    ("short", "header says 10000 images"),
    ("truncated_gz", "corrupt or truncated gzip file"),
    ("count", "holds 10000 images but"),
    ("label", "out of range"),
])
def test_corrupt_idx_files_fail_in_one_line(tmp_path, capsys, case, message):
    good = bytes(28 * 28 * 10000)
    labels = bytes([1] * 10000)
    images_gz, labels_gz = tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz"
    _idx(images_gz, 0x803, (10000, 28, 28), good)
    _idx(labels_gz, 0x801, (10000,), labels)
    if case == "missing":
        labels_gz.unlink()
    elif case == "magic":
        _idx(images_gz, 0x801, (10000, 28, 28), good)
    elif case == "short":
        _idx(images_gz, 0x803, (10000, 28, 28), good[:-784])
    elif case == "truncated_gz":
        _idx(images_gz, 0x803, (10000, 28, 28), good, truncate=200)
    elif case == "count":
        _idx(labels_gz, 0x801, (9999,), labels[:-1])
    elif case == "label":
        _idx(labels_gz, 0x801, (10000,), bytes([12] * 10000))
    rc = main(["train", *TRAIN_TINY, "data.source=mnist", f"data.path={tmp_path}", "data.split=test",
               f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert case == "count" or str(tmp_path) in err  # names the file


def test_idx_readers_on_hand_written_files(tmp_path, monkeypatch):
    """The IDX format (big-endian unsigned header, then one byte per pixel or label), gzipped or not."""
    from ditlab.data import mnist

    pixels = bytes((i * 7) % 256 for i in range(2 * 28 * 28))
    plain = tmp_path / "images-idx3-ubyte"  # not gzipped: read as it is
    plain.write_bytes(struct.pack(">IIII", 0x803, 2, 28, 28) + pixels)
    images = mnist.read_idx_images(plain)
    assert images.shape == (2, 1, 28, 28) and images.flatten().tolist() == list(pixels)

    empty_images, empty_labels = tmp_path / "empty-images.gz", tmp_path / "empty-labels.gz"
    _idx(empty_images, 0x803, (0, 28, 28), b"")  # a header alone: a valid file of no images
    _idx(empty_labels, 0x801, (0,), b"")
    assert mnist.read_idx_images(empty_images).shape == (0, 1, 28, 28)
    assert len(mnist.read_idx_labels(empty_labels)) == 0

    huge = tmp_path / "huge.gz"  # counts are unsigned: 2^31 images, not a negative number
    _idx(huge, 0x803, (2**31, 28, 28), b"")
    with pytest.raises(DitlabError, match=f"header says {2**31} images"):
        mnist.read_idx_images(huge)
    _idx(huge, 0x801, (2**31,), b"")
    with pytest.raises(DitlabError, match=f"header says {2**31} labels"):
        mnist.read_idx_labels(huge)

    labels = tmp_path / "labels.gz"
    _idx(labels, 0x801, (3,), bytes([0, 9, 10]))
    with pytest.raises(DitlabError, match="label 10 is out of range 0..9"):  # 10 classes by default
        mnist.read_idx_labels(labels)
    assert mnist.read_idx_labels(labels, num_classes=11).tolist() == [0, 9, 10]

    # load_idx_dataset: the training split by default, and its expected count checked
    monkeypatch.setitem(mnist.IDX_FILES, "train", ("train-images.gz", "train-labels.gz", 2))
    _idx(tmp_path / "train-images.gz", 0x803, (2, 28, 28), pixels)
    _idx(tmp_path / "train-labels.gz", 0x801, (2,), bytes([4, 2]))
    images, labels = mnist.load_idx_dataset(tmp_path)
    assert images.flatten().tolist() == list(pixels) and labels.tolist() == [4, 2]
    monkeypatch.setitem(mnist.IDX_FILES, "train", ("train-images.gz", "train-labels.gz", 3))
    with pytest.raises(DitlabError, match="2 images, expected 3 for the train split"):
        mnist.load_idx_dataset(tmp_path)


def test_image_dataset_maps_bytes_to_the_unit_interval():
    from ditlab.data.mnist import ImageTensorDataset

    images = torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8).view(5, 1, 1, 1)
    ds = ImageTensorDataset(images, torch.arange(5), num_classes=10)
    # two float32 roundings (the division, the subtraction) of values below 2 in magnitude: 2^-23 each at most
    assert [float(ds[i][0]) for i in range(5)] == pytest.approx([v / 127.5 - 1 for v in (0, 1, 128, 254, 255)],
                                                                abs=2 * 2**-23)
    assert float(ds[0][0]) == -1.0 and float(ds[4][0]) == 1.0
    bad = [(images.float(), 5), (images.view(5, 1, 1), 5), (images, 4)]  # not uint8, not 4-D, 5 images for 4 labels
    for bad_images, n_labels in bad:
        with pytest.raises(AssertionError):
            ImageTensorDataset(bad_images, torch.arange(n_labels), num_classes=10)


def test_idx_data_is_found_under_ditlab_data(tmp_path, monkeypatch):
    from ditlab.data.mnist import default_dir

    monkeypatch.setenv("DITLAB_DATA", str(tmp_path))
    assert default_dir("fashion-mnist") == tmp_path / "fashion-mnist"
    monkeypatch.delenv("DITLAB_DATA")
    with pytest.raises(DitlabError, match="data.source=mnist needs data.path or the DITLAB_DATA"):
        default_dir("mnist")


def test_center_crop_is_adm():
    # A 90x60 image -> 16: box-halve to 45x30 (30 >= 32 fails? no: 60 >= 32 once), then bicubic.
    arr = np.zeros((60, 90, 3), dtype=np.uint8)
    arr[20:40, 35:55] = 255  # a centred white square stays centred
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 16))
    assert out.shape == (16, 16, 3)
    ys, xs = np.nonzero(out[..., 0] > 128)
    assert abs(ys.mean() - 7.5) < 1.0 and abs(xs.mean() - 7.5) < 1.0
    # Reference: the same steps written out with PIL directly.
    im = Image.fromarray(arr).resize((45, 30), Image.BOX)
    im = im.resize((round(45 * 16 / 30), 16), Image.BICUBIC)
    ref = np.asarray(im)[:, (im.size[0] - 16) // 2:(im.size[0] - 16) // 2 + 16]
    np.testing.assert_array_equal(out, ref)


def _folder(root: Path, classes: int = 2, per_class: int = 3, size=(20, 24)) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"class_{c}" / f"{i}.png")


def test_image_folder_conditional_and_unconditional(tmp_path, capsys):
    _folder(tmp_path / "imgs", classes=3)
    cfg = load_config(None, ["data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=16",
                             "model.in_channels=3"])
    ds = build_dataset(cfg)
    assert len(ds) == 9 and ds.num_classes == 3 and sorted({int(ds[i][1]) for i in range(9)}) == [0, 1, 2]
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and -1 <= float(x.min()) and float(x.max()) <= 1
    # Unconditional training from the same folder (labels ignored), random flips on, via the CLI.
    run = tmp_path / "run"
    rc = main(["train", *TRAIN_TINY, "data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=16",
               "model.input_size=16", "model.in_channels=3", "model.num_classes=0", "data.random_flip=true",
               f"train.out_dir={run}"])
    assert rc == 0, capsys.readouterr().err
    assert (run / "checkpoints" / "step_0000002" / "ema.safetensors").is_file()
    # More class folders than the model has classes -> one line.
    rc = main(["train", *TRAIN_TINY, "data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=16",
               "model.input_size=16", "model.in_channels=3", "model.num_classes=2", f"train.out_dir={tmp_path / 'r2'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "3 class folders" in err and len(err.splitlines()) == 1


def test_corrupt_image_names_the_file(tmp_path, capsys):
    _folder(tmp_path / "imgs", classes=1, per_class=1)
    bad = tmp_path / "imgs" / "class_0" / "0.png"
    bad.write_bytes(b"not a png")
    rc = main(["train", *TRAIN_TINY, "data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=16",
               "model.input_size=16", "model.in_channels=3", "model.num_classes=1", f"train.out_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(bad) in err and len(err.splitlines()) == 1


def test_extract_latents_and_train_from_them(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    _folder(tmp_path / "imgs", classes=2, per_class=3)
    common = ["data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=16", "model.in_channels=3",
              f"vae.path={tmp_path / 'vae'}", "vae.sample_posterior=false"]
    out = tmp_path / "latents"
    rc = main(["extract-latents", *common, "--out", str(out), "--shard-size", "4", "--batch-size", "2", "--flip",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 6 and index["latent_shape"] == [4, 8, 8] and index["num_classes"] == 2
    assert [s["count"] for s in index["shards"]] == [4, 2]
    # The stored latents are the codec's scaled posterior means of the folder images (and of their mirrors).
    from ditlab.codecs import load_codec
    from ditlab.data.latents import LatentsDataset

    pix = build_dataset(load_config(None, common))
    codec = load_codec(load_config(None, common).vae)
    ds = LatentsDataset(out, use_flip=True)
    for i in (0, 5):
        x, y = pix[i]
        z, zy = ds[i]
        # Encoded in dataset order, --batch-size 2 at a time: recompute exactly that batch, so the
        # comparison is exact (a single-image forward may round differently from a batched one).
        first = i - i % 2
        batch = torch.stack([pix[first][0], pix[first + 1][0]])
        assert torch.equal(z[:4], codec.encode(batch)[i % 2])
        assert torch.equal(z[4:], codec.encode(batch.flip(-1))[i % 2])
        assert int(zy) == int(y)
    # Train a latent DiT from the shards (random flip picks stored mirrored latents).
    run = tmp_path / "run"
    rc = main(["train", *TRAIN_TINY, "data.source=latents", f"data.path={out}", "data.random_flip=true",
               "model.in_channels=4", "model.input_size=8", "model.num_classes=2", f"vae.path={tmp_path / 'vae'}",
               f"train.out_dir={run}"])
    assert rc == 0, capsys.readouterr().err
    assert (run / "samples" / "step_0000002.png").is_file()  # decoded through the VAE
    # A latent model fed with the wrong channel count fails in one line.
    rc = main(["train", *TRAIN_TINY, "data.source=latents", f"data.path={out}", "model.in_channels=3",
               "model.input_size=8", f"train.out_dir={tmp_path / 'r2'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model expects [3, 8, 8]" in err


def test_extract_latents_writes_through_the_checkpoint_writer(tmp_path, capsys, monkeypatch):
    # Latent shards share the checkpoint code's atomic write (one fsync'ed path to disk), so a
    # full disk there is a one-line error and leaves no index (the dataset stays "incomplete").
    import errno

    from ditlab import io

    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,),
                                  latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    _folder(tmp_path / "imgs", classes=2, per_class=1)

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_bytes_synced", full_disk)
    out = tmp_path / "latents"
    rc = main(["extract-latents", "data.source=folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=16",
               f"vae.path={tmp_path / 'vae'}", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot write latent shard" in err and "No space left" in err and len(err.splitlines()) == 1
    assert not (out / "index.json").exists()
