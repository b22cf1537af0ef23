"""The MNIST / Fashion-MNIST evaluator: shipped weights, accuracy on real digits, training CLI."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.cli import main
from ditlab.errors import DitlabError
from ditlab.eval.classifier import (
    EvalCNN,
    _random_shift,
    class_accuracy,
    default_data_dir,
    load_classifier,
    load_split,
    to_classifier_input,
    train_classifier,
    weights_path,
)

DATA = Path(os.environ.get("DITLAB_DATA", "../shared/data"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
REQUIRED = {"mnist": 0.993, "fashion-mnist": 0.92}


@pytest.mark.parametrize("dataset", list(REQUIRED))
def test_shipped_weights_small_with_metadata(dataset):
    path = weights_path(dataset)
    assert path.exists(), f"{path} must ship with the package"
    assert path.stat().st_size < 2 * 1024 * 1024
    model = load_classifier(dataset)
    assert not model.training
    assert model.metadata["dataset"] == dataset
    assert float(model.metadata["test_accuracy"]) >= REQUIRED[dataset]


def test_mnist_classifier_on_embedded_digits():
    # the 5,000 real MNIST training digits (500 per class) that ship with ditlab, in every install.
    from ditlab.data.mnist import load_embedded_mnist

    images, labels = load_embedded_mnist()
    idx = torch.arange(0, 5000, 5)  # 1,000 digits keeps the test quick
    assert class_accuracy(images[idx], labels[idx], "mnist") >= 0.99
    # uint8 [N,28,28,1] and float [-1,1] inputs are the same images to the classifier.
    x = images[idx[:50]]
    assert class_accuracy(x.permute(0, 2, 3, 1).numpy(), labels[idx[:50]]) == class_accuracy(
        x.float() / 127.5 - 1, labels[idx[:50]])


@pytest.mark.parametrize("dataset", list(REQUIRED))
def test_test_set_accuracy(dataset):
    # Every 4th test image (2,500) keeps this quick; the full-set accuracy is in the metadata
    # (and benchmarks/eval_floors.py). A 2,500-image estimate has a std of ~0.15% (MNIST).
    root = DATA / dataset
    if not (root / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("shared data not present")
    x, y = load_split(root, "test")
    assert len(x) == 10000
    assert class_accuracy(x[::4], y[::4], dataset) >= REQUIRED[dataset] - 0.004


def test_input_validation():
    with pytest.raises(DitlabError, match="28x28"):
        to_classifier_input(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DitlabError, match="NaN"):
        to_classifier_input(torch.full((2, 1, 28, 28), float("nan")))
    with pytest.raises(DitlabError, match=r"\[-1, 1\]"):
        to_classifier_input(torch.full((2, 1, 28, 28), 255.0))
    with pytest.raises(DitlabError, match="one label per image"):
        class_accuracy(np.zeros((3, 28, 28), np.uint8), [1, 2], model=EvalCNN().eval())


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x803 if array.ndim == 3 else 0x801
    header = struct.pack(">II", magic, len(array)) + (struct.pack(">II", *array.shape[1:]) if array.ndim == 3 else b"")
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_train_classifier_cli_end_to_end(tmp_path, capsys):
    # A learnable, shift-invariant toy IDX set: class 0 a horizontal bar, class 1 a vertical one.
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 64)):
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(y):
            r = rng.integers(6, 20)
            if c == 0:
                x[i, r : r + 3, 4:24] = 255
            else:
                x[i, 4:24, r : r + 3] = 255
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y)
    out = tmp_path / "cls.safetensors"
    code = main(["train-classifier", "--dataset", "mnist", "--data", str(tmp_path), "--out", str(out),
                 "--epochs", "3", "--batch-size", "16", "--width", "8", "--lr", "1e-2"])
    assert code == 0, capsys.readouterr().err
    model = load_classifier("mnist", out)
    assert model.metadata["width"] == "8" and float(model.metadata["test_accuracy"]) > 0.9
    assert main(["train-classifier", "--data", str(tmp_path / "nope")]) == 2
    assert "no t" in capsys.readouterr().err.splitlines()[-1]


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(DitlabError, match="ditlab train-classifier --dataset mnist"):
        load_classifier("mnist", tmp_path / "missing.safetensors")


def _toy_idx(root: Path, n_train: int, n_test: int = 16) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))


def test_train_classifier_batches_logs_and_metadata(tmp_path, monkeypatch):
    """Every step sees one full batch of distinct images; a log line every 100 steps and one per
    epoch; the file (in a folder made for it) records how it was trained."""
    import ditlab.eval.classifier as classifier

    _toy_idx(tmp_path, n_train=205)
    batches, forward = [], classifier.EvalCNN.forward

    def spy(self, x):
        if self.training:
            batches.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(classifier.EvalCNN, "forward", spy)
    lines = []
    out = tmp_path / "new" / "dir" / "cls.safetensors"
    result = train_classifier("mnist", tmp_path, out, epochs=2, batch_size=2, width=4, log=lines.append)
    assert batches == [2] * 204  # 102 steps an epoch; the odd image left out
    assert [ln.split(" loss")[0] for ln in lines if " step " in ln] == ["epoch 1 step 100/204", "epoch 2 step 200/204"]
    epochs = [ln.split(" (")[0] for ln in lines if "test accuracy" in ln]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1", "epoch 2"]
    assert epochs[1] == f"epoch 2: test accuracy {result['test_accuracy']:.4f}"
    model = load_classifier("mnist", out)
    meta = model.metadata
    assert {k: meta[k] for k in ("dataset", "epochs", "width", "feature_dim", "input")} == \
        {"dataset": "mnist", "epochs": "2", "width": "4", "feature_dim": "128", "input": "[B,1,28,28] float in [-1,1]"}
    assert meta["test_accuracy"] == f"{result['test_accuracy']:.4f}"
    assert 0 <= float(meta["train_seconds"]) <= result["seconds"] + 1 and result["seconds"] < 600
    assert result["dataset"] == "mnist" and result["path"] == str(out)


def test_random_shift_moves_each_image_whole_and_fills_with_background():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 28, 28) * 2 - 1
    shifted = _random_shift(x, 2, g)
    seen = set()
    for img, out in zip(x[:, 0], shifted[:, 0]):
        padded = torch.nn.functional.pad(img, (2, 2, 2, 2), value=-1.0)
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out, padded[dy:dy + 28, dx:dx + 28])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {(dy, dx) for dy in range(5) for dx in range(5)}  # every shift of up to 2 pixels, both axes
    assert torch.equal(_random_shift(x, 2, torch.Generator().manual_seed(0)), shifted)  # the generator decides


def test_default_data_dir(tmp_path, monkeypatch):
    (tmp_path / "env" / "mnist").mkdir(parents=True)
    monkeypatch.setenv("DITLAB_DATA", str(tmp_path / "env"))
    assert default_data_dir("mnist") == tmp_path / "env" / "mnist"
    monkeypatch.delenv("DITLAB_DATA")
    (tmp_path / "shared" / "data" / "fashion-mnist").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert default_data_dir("fashion-mnist").resolve() == tmp_path / "shared" / "data" / "fashion-mnist"


class _SaysThree(EvalCNN):
    """An evaluator that calls every image a 3."""

    def __init__(self):
        super().__init__(width=4)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.bias[3] = 1.0


def test_class_accuracy_uses_the_given_model_and_any_label_container():
    images = np.zeros((8, 28, 28), dtype=np.uint8)
    labels = [3, 3, 3, 1, 2, 3, 0, 3]
    model = _SaysThree().eval()
    for container in (labels, np.array(labels), torch.tensor(labels), np.array(labels, dtype=np.uint8)):
        assert class_accuracy(images, container, model=model) == 5 / 8
    with pytest.raises(DitlabError, match="one label per image"):
        class_accuracy(images, labels[:-1], model=model)
